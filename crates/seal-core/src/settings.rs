//! Settings described once. Each settings struct derives `JsonSchema`: a field's doc comment
//! is its label, a blank line, then its help; its default, range and choices (an enum's
//! variants with their docs) come from the type. The page builds its forms from [`fields`],
//! the CLI its flags, and [`check`] enforces the ranges for both.

pub use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};

/// What a field holds, as a form or a flag offers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Integer,
    Number,
    Boolean,
    /// One of `options`.
    Choice,
    /// Any of `options` (a list).
    Choices,
}

/// Where the page shows a field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    /// In the form itself.
    Basic,
    /// Under "advanced".
    #[default]
    Advanced,
    /// Not in the page (set from other fields); the CLI still offers it.
    Hidden,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    pub value: String,
    pub help: String,
}

/// One setting, as its type describes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Field {
    /// The serde name (`steps`, `attn_target`).
    pub key: String,
    pub label: String,
    pub help: String,
    pub kind: Kind,
    pub options: Vec<Choice>,
    /// May be empty (`None`: the help says what that means).
    pub optional: bool,
    pub minimum: Option<f64>,
    /// The value must be above this (not equal).
    pub exclusive_minimum: Option<f64>,
    pub maximum: Option<f64>,
    /// The least number of choices a list needs.
    pub min_items: Option<usize>,
    pub default: Value,
    pub place: Place,
}

/// The fields of `T`, in declaration order.
pub fn fields<T: JsonSchema>() -> Vec<Field> {
    let schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>();
    let root = schema.as_value();
    let defs = root.get("$defs").cloned().unwrap_or(Value::Null);
    let properties = root.get("properties").and_then(Value::as_object).expect("settings are structs");
    properties.iter().map(|(key, p)| field(key, p, &defs)).collect()
}

fn field(key: &str, p: &Value, defs: &Value) -> Field {
    let description = p.get("description").and_then(Value::as_str).unwrap_or_default();
    let (label, help) = match description.split_once("\n\n") {
        Some((label, help)) => (label.trim().to_string(), help.split_whitespace().collect::<Vec<_>>().join(" ")),
        None => (description.trim().to_string(), String::new()),
    };
    let types: Vec<&str> = match p.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    // `x-options` narrows a type's variants to those this field accepts.
    let allowed: Option<Vec<&str>> = p.get("x-options").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect());
    let choices = |v: &Value| choices(resolve(v, defs)).into_iter().filter(|c| allowed.as_ref().is_none_or(|a| a.contains(&c.value.as_str()))).collect::<Vec<_>>();
    let (kind, options) = if let Some(items) = p.get("items") {
        (Kind::Choices, choices(items))
    } else if types.is_empty() {
        (Kind::Choice, choices(p))
    } else if types.contains(&"boolean") {
        (Kind::Boolean, vec![])
    } else if types.contains(&"integer") {
        (Kind::Integer, vec![])
    } else {
        (Kind::Number, vec![])
    };
    let number = |name: &str| p.get(name).and_then(Value::as_f64);
    // Unsigned integers carry `minimum: 0` of their own; a declared range overrides it.
    Field {
        key: key.into(),
        label,
        help,
        kind,
        options,
        optional: types.contains(&"null"),
        minimum: number("minimum"),
        exclusive_minimum: number("exclusiveMinimum"),
        maximum: number("maximum"),
        min_items: p.get("minItems").and_then(Value::as_u64).map(|n| n as usize),
        default: p.get("default").cloned().unwrap_or(Value::Null),
        place: match p.get("x-place").and_then(Value::as_str) {
            Some("basic") => Place::Basic,
            Some("hidden") => Place::Hidden,
            _ => Place::Advanced,
        },
    }
}

/// `v` itself, or the definition its `$ref` names.
fn resolve<'a>(v: &'a Value, defs: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => &defs[name],
        None => v,
    }
}

/// An enum's variants: `oneOf` constants with their docs, or a bare `enum` list.
fn choices(v: &Value) -> Vec<Choice> {
    let text = |x: &Value| x.as_str().unwrap_or_default().to_string();
    if let Some(variants) = v.get("oneOf").and_then(Value::as_array) {
        return variants.iter().map(|c| Choice { value: text(&c["const"]), help: text(&c["description"]) }).collect();
    }
    v.get("enum").and_then(Value::as_array).map_or(vec![], |values| values.iter().map(|c| Choice { value: text(c), help: String::new() }).collect())
}

/// Checks `settings` against its schema's ranges; the message starts with `what` and names
/// the field and the bound. Non-finite numbers (which serialise as null) are refused.
pub fn check<T: JsonSchema + Serialize>(what: &str, settings: &T) -> Result<(), String> {
    let values = serde_json::to_value(settings).map_err(|e| format!("{what}: {e}"))?;
    for f in fields::<T>() {
        let value = &values[&f.key];
        let bad = |m: String| Err(format!("{what}: {} {m}", f.key));
        match f.kind {
            Kind::Integer | Kind::Number => {
                let Some(x) = value.as_f64() else {
                    if value.is_null() && f.optional {
                        continue;
                    }
                    return bad("must be a finite number".into());
                };
                if let Some(m) = f.minimum.filter(|&m| x < m) {
                    return bad(format!("must be at least {m} (got {x})"));
                }
                if let Some(m) = f.exclusive_minimum.filter(|&m| x <= m) {
                    return bad(format!("must be above {m} (got {x})"));
                }
                if let Some(m) = f.maximum.filter(|&m| x > m) {
                    return bad(format!("must be at most {m} (got {x})"));
                }
            }
            Kind::Choices => {
                let n = value.as_array().map_or(0, Vec::len);
                if let Some(m) = f.min_items.filter(|&m| n < m) {
                    return bad(format!("needs at least {m} of {}", names(&f.options)));
                }
            }
            Kind::Boolean | Kind::Choice => {}
        }
    }
    Ok(())
}

/// `a, b or c`.
pub fn names(options: &[Choice]) -> String {
    let all: Vec<&str> = options.iter().map(|c| c.value.as_str()).collect();
    match all.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => all.join(""),
    }
}

/// `settings` with `overrides` (field name → value) applied, as `T`; each value is checked
/// against its field's type by serde.
pub fn with_overrides<T: Serialize + serde::de::DeserializeOwned>(what: &str, settings: &T, overrides: &Map<String, Value>) -> Result<T, String> {
    let mut values = serde_json::to_value(settings).map_err(|e| format!("{what}: {e}"))?;
    for (k, v) in overrides {
        values[k] = v.clone();
    }
    serde_json::from_value(values).map_err(|e| format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::ScanSettings;
    use crate::unlearn::SealSettings;
    use crate::unlearn::instant::InstantSettings;

    fn all() -> Vec<(&'static str, Vec<Field>)> {
        vec![("thorough", fields::<SealSettings>()), ("instant", fields::<InstantSettings>()), ("scan", fields::<ScanSettings>())]
    }

    #[test]
    fn every_setting_has_a_label_help_and_its_default() {
        for (group, fields) in all() {
            for f in &fields {
                assert!(!f.label.is_empty() && !f.help.is_empty(), "{group}.{}: label {:?}, help {:?}", f.key, f.label, f.help);
                assert!(!f.default.is_null() || f.optional, "{group}.{} has no default", f.key);
                if matches!(f.kind, Kind::Choice | Kind::Choices) {
                    assert!(f.options.len() >= 2 && f.options.iter().all(|c| !c.value.is_empty()), "{group}.{}: {:?}", f.key, f.options);
                }
            }
        }
        let seal = fields::<SealSettings>();
        let keys: Vec<&str> = seal.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(&keys[..3], ["steps", "batch", "rank"], "declaration order");
        let target = seal.iter().find(|f| f.key == "attn_target").unwrap();
        assert_eq!((target.kind, names(&target.options).as_str(), target.place), (Kind::Choice, "zeros, noise or substitute", Place::Basic));
        let targets = seal.iter().find(|f| f.key == "targets").unwrap();
        assert_eq!((targets.kind, targets.min_items, targets.default.clone()), (Kind::Choices, Some(1), serde_json::json!(["to_k", "to_v"])));
        let resolution = seal.iter().find(|f| f.key == "resolution").unwrap();
        assert_eq!((resolution.kind, resolution.optional), (Kind::Integer, true));
    }

    #[test]
    fn ranges_from_the_schema_are_enforced() {
        let ok = SealSettings::default();
        assert_eq!(check("settings", &ok), Ok(()));
        let err = |s: SealSettings| check("settings", &s).unwrap_err();
        assert_eq!(err(SealSettings { steps: 0, ..ok.clone() }), "settings: steps must be at least 1 (got 0)");
        assert_eq!(err(SealSettings { alpha: 0.0, ..ok.clone() }), "settings: alpha must be above 0 (got 0)");
        assert_eq!(err(SealSettings { lr: f64::NAN, ..ok.clone() }), "settings: lr must be a finite number");
        assert_eq!(err(SealSettings { attn_weight: 1.5, ..ok.clone() }), "settings: attn_weight must be at most 1 (got 1.5)");
        assert_eq!(err(SealSettings { targets: vec![], ..ok.clone() }), "settings: targets needs at least 1 of to_q, to_k, to_v or to_out.0");
        assert!(check("settings", &SealSettings { resolution: Some(64), ..ok }).is_ok());
    }

    #[test]
    fn overrides_are_typed_by_serde() {
        let base = SealSettings::default();
        let mut o = Map::new();
        o.insert("steps".into(), Value::from(7));
        o.insert("attn_target".into(), Value::from("zeros"));
        let s = with_overrides("settings", &base, &o).unwrap();
        assert_eq!((s.steps, s.attn_target), (7, crate::unlearn::AttnTarget::Zeros));
        o.insert("steps".into(), Value::from(-1));
        assert!(with_overrides("settings", &base, &o).unwrap_err().starts_with("settings: "));
    }
}
