//! Hugging Face PEFT LoRA adapter directories: the one reader (never unpickling),
//! PEFT's pattern rule, and the conversion into an asymlora adapter.
//!
//! A directory holds `adapter_config.json` and `adapter_model.safetensors`. Module `m`
//! (a name from the base model's `named_modules()`) has `base_model.model.{m}.lora_A.weight`
//! (r x d_in) and `...lora_B.weight` (d_out x r); its update is `s * B @ A` with
//! `s = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, where `r` and `alpha` come
//! from `rank_pattern` / `alpha_pattern` ([`PatternRule`]) or else `r` / `lora_alpha`.
//! `fan_in_fan_out` means the base stores the weight transposed (GPT-2's `Conv1D`).
//! Tensors of `modules_to_save` replace the base model's tensors of the same name.
//!
//! Other kinds, in PEFT's own layouts: `nn.Embedding` LoRA as `{m}.lora_embedding_A`
//! (r x num_embeddings) and `{m}.lora_embedding_B` (dim x r), the weight being `W^T`;
//! convolutions as `lora_A.weight` (r, c_in, *kernel) and `lora_B.weight` (c_out, r, 1..),
//! flattened to matrices; `target_parameters` as `ParamWrapper`s on the parameter's
//! module, `lora_A.weight` (E r x d_in) and `lora_B.weight` (d_out x r E, interleaved:
//! expert `e`'s column `k` is `k E + e`), nested under `.base_layer` when one module has
//! several targeted parameters (the last in `target_parameters` outermost). The copy of
//! an embedding weight `save_embedding_layers` adds (`{m}.base_layer.weight`) is ignored
//! with a warning.
//!
//! Refused, with a message naming the reason: other PEFT methods, DoRA and the other
//! LoRA variants that change the computation, trained biases, non-float (quantised)
//! factors, a pickled `adapter_model.bin` only. The merge,
//! `import_peft` and the CLI all read through [`PeftAdapter::open`], so a directory
//! gets the same verdict and message everywhere.

mod import;
mod pattern;
mod reader;

pub use import::{import_peft, ImportReport};
pub use pattern::{BadPattern, PatternRule};
pub use reader::{is_integer, peft_dir, PeftAdapter, PeftModule};

pub const CONFIG_NAME: &str = "adapter_config.json";
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
pub const PICKLE_WEIGHTS_NAME: &str = "adapter_model.bin";
/// The order in which a module's parameters are taken to be registered, which is the
/// order PEFT nests their `ParamWrapper`s in (the last outermost): transformers' MoE
/// experts register `gate_up_proj` (or `gate_proj`, `up_proj`) before `down_proj`; other
/// names follow, by name. A PEFT directory records neither that order nor a usable one
/// (`target_parameters` is saved in no fixed order).
pub const PARAMETER_ORDER: [&str; 4] = ["gate_up_proj", "gate_proj", "up_proj", "down_proj"];

/// Sorts parameter names of one module by [`PARAMETER_ORDER`], then by name.
pub fn sort_parameters(params: &mut [String]) {
    let rank = |p: &String| {
        PARAMETER_ORDER
            .iter()
            .position(|k| k == p)
            .unwrap_or(PARAMETER_ORDER.len())
    };
    params.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
}

/// The prefix `PeftModel.save_pretrained` gives every tensor key.
pub const KEY_PREFIX: &str = "base_model.model.";
