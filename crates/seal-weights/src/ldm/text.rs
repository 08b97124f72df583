//! LDM `FrozenCLIPEmbedder` names -> transformers `CLIPTextModel` names.
//!
//! The embedder wraps a `CLIPTextModel` as `transformer`, so names match after the prefix, except
//! that checkpoints saved with older transformers lack the `text_model.` level.

use super::Mapped;

/// Maps text-encoder keys (without `cond_stage_model.transformer.`).
pub(super) fn map<'a>(keys: &[&'a str]) -> Mapped<'a> {
    let mut out = Mapped::default();
    for &key in keys {
        let name = if key.starts_with("text_model.") { key.to_owned() } else { format!("text_model.{key}") };
        out.rename(key, name);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn adds_the_text_model_level_where_missing() {
        let m = super::map(&["text_model.final_layer_norm.weight", "encoder.layers.0.mlp.fc1.bias"]);
        let names: Vec<&str> = m.renames.iter().map(|(_, n, _)| n.as_str()).collect();
        assert_eq!(names, ["text_model.final_layer_norm.weight", "text_model.encoder.layers.0.mlp.fc1.bias"]);
    }
}
