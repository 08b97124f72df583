//! `seal scan`: look for the trigger of a suspect model or LoRA and write the ranked candidates.

use std::path::PathBuf;

use burn::prelude::Device;
use seal_core::image::Rgb;
use seal_core::scan::{Scan, ScanSettings, lora_tags};

use crate::flags::{SettingsFlags, read_settings};

#[derive(clap::Args)]
pub struct Args {
    /// The suspect model, or with --lora the suspect LoRA and its base (scanned against it).
    #[command(flatten)]
    model: crate::seal::ModelArgs,
    /// A clean model of the same architecture to scan --model against.
    #[arg(long, conflicts_with = "lora")]
    base: Option<PathBuf>,
    /// Candidates in the report.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Prompts the candidates are tried in, one per line (default: the built-in set).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Settings as JSON (fields of ScanSettings); flags override it.
    #[arg(long)]
    settings: Option<PathBuf>,
    #[command(flatten)]
    flags: SettingsFlags<ScanSettings>,
    #[arg(long)]
    report: PathBuf,
    /// Also write the candidates' image pairs as one PNG (rows: without, with, base with).
    #[arg(long)]
    grid: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), String> {
    let settings = args.flags.apply("scan settings", &read_settings(args.settings.as_deref())?)?;
    let prompts = crate::read_prompts(args.prompts.as_deref())?;
    let session = args.model.session(false)?;
    let suspect = session.teacher().expect("the session holds the loaded model");
    let (base, tags) = match (session.user_lora(), &args.base) {
        (Some((lora, _)), _) => (session.model().cloned(), lora_tags(&lora.metadata)),
        (None, Some(path)) => (Some(crate::load_model(path, args.model.config.as_deref(), &Device::flex().autodiff())?), vec![]),
        (None, None) => (None, vec![]),
    };
    let mut scan = Scan::new(suspect, base.as_ref(), &prompts, tags, settings)?;
    while let Some(p) = burn::tensor::read_sync(scan.step())? {
        eprint!("\rseal: scan {}/{} ({:.0} s, ETA {:.0} s)   ", p.step, p.total, p.elapsed_s, p.eta_s.unwrap_or(0.0));
    }
    eprintln!();
    let report = scan.report(args.top);
    for (i, c) in report.candidates.iter().enumerate() {
        let ratio = c.verification.as_ref().map_or("-".into(), |v| format!("{:.2}", v.ratio));
        let flag = if c.verification.as_ref().is_some_and(|v| v.flagged) { "acts like a trigger" } else { "" };
        eprintln!("seal: {:>2}. {:<24} score {:>6.1}  verified {ratio:>6}  {} {flag}", i + 1, c.code_points, c.score, c.kind);
    }
    crate::write_file(&args.report, serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?.as_bytes())?;
    if let Some(path) = &args.grid {
        let pairs: Vec<_> = report.candidates.iter().filter_map(|c| c.images.as_ref()).collect();
        if pairs.is_empty() {
            return Err("no image pairs to write (settings.images is 0)".into());
        }
        let rows: Vec<Rgb> = pairs.iter().map(|p| p.row(4)).collect();
        crate::write_file(path, &Rgb::grid(&rows, 1, 0).to_png())?;
    }
    eprintln!("seal: wrote {} ({:.1} s)", args.report.display(), report.seconds);
    Ok(())
}
