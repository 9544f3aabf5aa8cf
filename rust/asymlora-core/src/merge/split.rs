//! Fused MoE expert parameters merged into the per-expert tensors of a checkpoint.
//!
//! transformers 5 fuses the experts of an MoE model in memory (`mlp.experts.gate_up_proj`
//! of shape (E, 2I, H), `mlp.experts.down_proj` (E, H, I)), so adapters on them (PEFT's
//! `target_parameters`, ours) name the fused parameters. But `save_pretrained` converts
//! back, and the checkpoints on the Hub hold one linear per expert and projection
//! (Mixtral: `block_sparse_moe.experts.{e}.w1/w3/w2.weight`; Qwen2/3-MoE, OLMoE,
//! DeepSeek: `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`). Expert `e`'s block of
//! `gate_up_proj` is the gate projection's weight stacked over the up projection's
//! (rows `0..I` and `I..2I`), and its block of `down_proj` is the down projection's
//! weight, so a fused module's update `s·B_e·A_e` splits by rows of `B_e` into updates
//! of those tensors, with the same arithmetic as any linear.

use std::ops::Range;

use crate::adapter::{ModuleKind, Placement};

/// The part of a fused module's update that one checkpoint tensor receives: rows
/// `rows` of the block of expert `block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Part {
    pub block: usize,
    pub rows: Range<usize>,
}

/// One checkpoint tensor and the part of the module it receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Piece {
    pub tensor: String,
    pub part: Part,
}

/// Per-expert layouts on disk: the module holding the experts (in place of `mlp`), the
/// gate and up projections (stacked in `gate_up_proj`), the down projection.
const LAYOUTS: [(&str, [&str; 2], &str); 2] = [
    ("block_sparse_moe", ["w1", "w3"], "w2"),       // Mixtral, PhiMoE
    ("mlp", ["gate_proj", "up_proj"], "down_proj"), // Qwen2/3-MoE, OLMoE, DeepSeek, ...
];

/// The layouts this module tries, for messages.
pub(super) const DESCRIPTION: &str =
    "per-expert tensors {moe}.experts.{e}.{w1,w3,w2}.weight (Mixtral) or mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight";

/// The checkpoint tensors that hold the blocks of the fused expert parameter `target`
/// (as named in the model), in the first layout whose every tensor `exists`; `None`
/// when `target` is not a fused `experts.gate_up_proj` / `experts.down_proj` stored
/// d_out x d_in per expert, or when no layout is complete.
pub(super) fn per_expert_pieces(target: &str, place: &Placement, exists: impl Fn(&str) -> bool) -> Option<Vec<Piece>> {
    let experts = place.experts?;
    if place.kind != ModuleKind::Parameter || place.transposed {
        return None;
    }
    let (parent, projection) = target.rsplit_once(".experts.")?;
    let outer = parent.rsplit_once('.').map_or("", |(outer, _)| outer);
    let half = place.d_out / 2;
    LAYOUTS.iter().find_map(|&(moe, [gate, up], down)| {
        let holder = if outer.is_empty() {
            moe.to_string()
        } else {
            format!("{outer}.{moe}")
        };
        let name = |e: usize, p: &str| format!("{holder}.experts.{e}.{p}.weight");
        let parts: Vec<(&str, Range<usize>)> = match projection {
            "gate_up_proj" if place.d_out % 2 == 0 => vec![(gate, 0..half), (up, half..place.d_out)],
            "down_proj" => vec![(down, 0..place.d_out)],
            _ => return None,
        };
        let pieces: Vec<Piece> = (0..experts)
            .flat_map(|e| {
                parts.iter().map(move |(p, rows)| Piece {
                    tensor: name(e, p),
                    part: Part {
                        block: e,
                        rows: rows.clone(),
                    },
                })
            })
            .collect();
        pieces.iter().all(|p| exists(&p.tensor)).then_some(pieces)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experts(d_in: usize, d_out: usize, e: usize) -> Placement {
        Placement {
            kind: ModuleKind::Parameter,
            experts: Some(e),
            ..Placement::linear(d_in, d_out, false)
        }
    }

    #[test]
    fn mixtral_gate_up_splits_into_w1_over_w3() {
        let have = |n: &str| n.contains(".block_sparse_moe.experts.");
        let p = per_expert_pieces("model.layers.3.mlp.experts.gate_up_proj", &experts(8, 12, 2), have).unwrap();
        let got: Vec<(&str, usize, Range<usize>)> = p
            .iter()
            .map(|p| (p.tensor.as_str(), p.part.block, p.part.rows.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("model.layers.3.block_sparse_moe.experts.0.w1.weight", 0, 0..6),
                ("model.layers.3.block_sparse_moe.experts.0.w3.weight", 0, 6..12),
                ("model.layers.3.block_sparse_moe.experts.1.w1.weight", 1, 0..6),
                ("model.layers.3.block_sparse_moe.experts.1.w3.weight", 1, 6..12),
            ]
        );
    }

    #[test]
    fn qwen_down_is_one_tensor_per_expert() {
        let p = per_expert_pieces("m.mlp.experts.down_proj", &experts(6, 8, 3), |n| {
            n.ends_with("down_proj.weight")
        });
        let names: Vec<String> = p.unwrap().into_iter().map(|p| p.tensor).collect();
        assert_eq!(
            names,
            [
                "m.mlp.experts.0.down_proj.weight",
                "m.mlp.experts.1.down_proj.weight",
                "m.mlp.experts.2.down_proj.weight"
            ]
        );
    }

    #[test]
    fn incomplete_transposed_or_other_parameters_do_not_split() {
        let all = |_: &str| true;
        let one_missing = |n: &str| !n.contains("experts.1.w3");
        assert!(
            per_expert_pieces("x.mlp.experts.gate_up_proj", &experts(8, 12, 2), one_missing)
                .is_some_and(|p| p[0].tensor.contains("gate_proj"))
        );
        let none = |_: &str| false;
        assert!(per_expert_pieces("x.mlp.experts.gate_up_proj", &experts(8, 12, 2), none).is_none());
        let mut t = experts(8, 12, 2);
        t.transposed = true;
        assert!(per_expert_pieces("x.mlp.experts.gate_up_proj", &t, all).is_none());
        assert!(per_expert_pieces("x.mlp.experts.gate_up_proj", &experts(8, 11, 2), all).is_none());
        assert!(per_expert_pieces("x.mlp.experts.other", &experts(8, 12, 2), all).is_none());
        assert!(per_expert_pieces("x.mlp.router.weight", &Placement::linear(8, 2, false), all).is_none());
    }
}
