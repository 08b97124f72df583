//! Command-line flags made from a settings type (`seal_core::settings`): one flag per field,
//! named after it (`--attn-target`, `--instant-max-rank`), with its label, help, choices and
//! default. A flag overrides the settings file (`--settings FILE`) or the defaults.

use std::marker::PhantomData;

use clap::builder::PossibleValuesParser;
use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches, Command};
use seal_core::scan::ScanSettings;
use seal_core::settings::{Field, JsonSchema, Kind, fields, with_overrides};
use seal_core::unlearn::SealSettings;
use seal_core::unlearn::instant::InstantSettings;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A settings type with flags: their prefix and the heading they are listed under.
pub trait Flagged: JsonSchema + Serialize + DeserializeOwned {
    const PREFIX: &'static str;
    const HEADING: &'static str;
}

impl Flagged for SealSettings {
    const PREFIX: &'static str = "";
    const HEADING: &'static str = "Thorough seal (SKD-CAG)";
}

impl Flagged for InstantSettings {
    const PREFIX: &'static str = "instant-";
    const HEADING: &'static str = "Instant seal (closed-form edit)";
}

impl Flagged for ScanSettings {
    const PREFIX: &'static str = "";
    const HEADING: &'static str = "Scan";
}

/// The flags given for `T`'s fields, as field name → value.
pub struct SettingsFlags<T> {
    overrides: Map<String, Value>,
    _settings: PhantomData<T>,
}

impl<T: Flagged> SettingsFlags<T> {
    /// `base` with the flags given applied.
    pub fn apply(&self, what: &str, base: &T) -> Result<T, String> {
        with_overrides(what, base, &self.overrides)
    }

    /// Whether a flag for `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.overrides.contains_key(key)
    }
}

fn flag_name<T: Flagged>(f: &Field) -> String {
    format!("{}{}", T::PREFIX, f.key.replace('_', "-"))
}

fn arg<T: Flagged>(f: &Field) -> Arg {
    let name = flag_name::<T>(f);
    let default = match &f.default {
        Value::Null => "the model's own".to_string(),
        Value::Array(v) => v.iter().map(|x| x.as_str().unwrap_or_default()).collect::<Vec<_>>().join(","),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let arg = Arg::new(name.clone()).long(name).action(ArgAction::Set).help(format!("{}: {} [default: {default}]", f.label, f.help));
    let values = || PossibleValuesParser::new(f.options.iter().map(|c| clap::builder::PossibleValue::new(c.value.clone()).help(c.help.clone())));
    match f.kind {
        Kind::Choice => arg.value_parser(values()),
        Kind::Choices => arg.value_parser(values()).value_delimiter(',').num_args(1..).value_name("A,B"),
        Kind::Boolean => arg.value_parser(["true", "false"]),
        Kind::Integer => arg.value_name("N"),
        Kind::Number => arg.value_name("X"),
    }
}

/// The flag's text as the field's JSON value.
fn value(f: &Field, flag: &str, m: &ArgMatches) -> Result<Option<Value>, String> {
    let Some(mut given) = m.get_many::<String>(flag) else { return Ok(None) };
    let bad = |s: &str, what: &str| format!("--{flag} {s:?}: expected {what}");
    let v = match f.kind {
        Kind::Choices => Value::from(given.cloned().collect::<Vec<_>>()),
        Kind::Choice => Value::from(given.next().cloned().unwrap_or_default()),
        Kind::Boolean => Value::from(given.next().is_some_and(|s| s == "true")),
        Kind::Integer => {
            let s = given.next().cloned().unwrap_or_default();
            Value::from(s.parse::<u64>().map_err(|_| bad(&s, "a whole number, at least 0"))?)
        }
        Kind::Number => {
            let s = given.next().cloned().unwrap_or_default();
            let x = s.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| bad(&s, "a finite number"))?;
            Value::from(x)
        }
    };
    Ok(Some(v))
}

impl<T: Flagged> clap::FromArgMatches for SettingsFlags<T> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut overrides = Map::new();
        for f in fields::<T>() {
            if let Some(v) = value(&f, &flag_name::<T>(&f), m).map_err(|e| clap::Error::raw(ErrorKind::ValueValidation, format!("{e}\n")))? {
                overrides.insert(f.key.clone(), v);
            }
        }
        Ok(SettingsFlags { overrides, _settings: PhantomData })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl<T: Flagged> clap::Args for SettingsFlags<T> {
    fn augment_args(cmd: Command) -> Command {
        cmd.next_help_heading(T::HEADING).args(fields::<T>().iter().map(arg::<T>))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// `settings`, from a JSON file of its fields when given, else the defaults.
pub fn read_settings<T: Flagged + Default>(path: Option<&std::path::Path>) -> Result<T, String> {
    match path {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?).map_err(|e| format!("{}: {e}", p.display())),
        None => Ok(T::default()),
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        thorough: SettingsFlags<SealSettings>,
        #[command(flatten)]
        instant: SettingsFlags<InstantSettings>,
    }

    #[test]
    fn flags_follow_the_settings_types() {
        let cli = Cli::try_parse_from([
            "seal",
            "--steps",
            "7",
            "--attn-target",
            "zeros",
            "--targets",
            "to_k,to_v,to_q",
            "--text-encoder",
            "false",
            "--instant-max-rank",
            "8",
            "--resolution",
            "64",
        ])
        .unwrap();
        let s = cli.thorough.apply("settings", &SealSettings::default()).unwrap();
        assert_eq!((s.steps, s.attn_target, s.targets.len(), s.text_encoder, s.resolution), (7, seal_core::unlearn::AttnTarget::Zeros, 3, false, Some(64)));
        let i = cli.instant.apply("instant settings", &InstantSettings::default()).unwrap();
        assert_eq!(i.max_rank, 8);
        assert!(!cli.instant.has("placements"));
        // Choices are checked, with the type's variants listed.
        let err = Cli::try_parse_from(["seal", "--latents", "pixels"]).err().unwrap().to_string();
        assert!(err.contains("noise") && err.contains("trajectory") && err.contains("student"), "{err}");
        // The instant seal's projections are narrowed to what sees the text.
        assert!(Cli::try_parse_from(["seal", "--instant-targets", "to_q"]).is_err());
        assert!(Cli::try_parse_from(["seal", "--steps", "-3"]).is_err());
        assert!(Cli::try_parse_from(["seal", "--lr", "fast"]).is_err());
        let help = Cli::augment_args(Command::new("seal")).render_long_help().to_string();
        assert!(help.contains("--preserve-weight") && help.contains("Preservation weight: Keeps clean prompts"), "{help}");
        let _ = Cli::from_arg_matches(&Cli::augment_args(Command::new("seal")).get_matches_from(["seal"])).unwrap();
    }
}
