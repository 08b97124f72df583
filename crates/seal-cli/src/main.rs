//! The native `seal` command: a thin dispatcher over seal-core.

use std::process::ExitCode;

use burn::prelude::Device;

const USAGE: &str = "\
usage: seal <command>

commands:
  probe    run the autodiff probe on the CPU (flex) backend and print its result as JSON
  help     show this message
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("probe") => probe(&args[1..]),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`")),
        None => Err("no command given".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("seal: {message}\n\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn probe(args: &[String]) -> Result<(), String> {
    if let Some(extra) = args.first() {
        return Err(format!("probe takes no arguments, got `{extra}`"));
    }
    let result = burn::tensor::read_sync(seal_core::probe::autodiff_probe(&Device::flex()))?;
    println!("{}", serde_json::to_string(&result).map_err(|e| e.to_string())?);
    Ok(())
}
