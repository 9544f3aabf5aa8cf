//! The human-readable summary behind `asymlora inspect`.

use std::fmt::Write;

use super::config::ModuleConfig;
use super::file::AdapterFile;
use super::lora_b_name;

/// Bytes in a human unit, e.g. `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A module's kind as the table shows it: `conv [3, 3]`, `parameter 8 experts transposed`.
fn kind_label(m: &ModuleConfig) -> String {
    let mut s = m.kind.name().to_string();
    if let Some(kernel) = &m.kernel {
        s.push_str(&format!(" {kernel:?}"));
    }
    if let Some(e) = m.experts {
        s.push_str(&format!(" {e} experts"));
    }
    if m.transposed == Some(true) {
        s.push_str(" transposed");
    }
    s
}

/// Renders modules, shapes, rank, seed, generator and the file size next to the
/// size the same adapter would take with every `A` stored (classic LoRA).
pub fn render_inspect(file: &AdapterFile) -> String {
    let c = file.config();
    let mut out = String::new();
    let stored = c.modules.values().filter(|m| m.a_stored).count();
    let _ = writeln!(out, "adapter     {}", file.path().display());
    let _ = writeln!(out, "format      asymlora v1 (seed-plus-B)");
    let _ = writeln!(
        out,
        "generator   {}  seed {}  A dtype {}{}",
        c.generator,
        c.seed,
        c.a_dtype,
        if c.a_gain != 1.0 {
            format!("  gain {}", c.a_gain)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "rank        {}  alpha {}  scaling {}",
        c.rank,
        c.alpha,
        c.scaling.name()
    );
    let _ = writeln!(
        out,
        "modules     {} ({} with stored A, {} regenerated from the seed)",
        c.modules.len(),
        stored,
        c.modules.len() - stored
    );
    if !c.full_tensors.is_empty() {
        let _ = writeln!(out, "full        {}", c.full_tensors.join(", "));
    }
    let width = c.modules.keys().map(String::len).max().unwrap_or(6).max(6);
    let _ = writeln!(out);
    let kinds: Vec<String> = c.modules.values().map(kind_label).collect();
    // The kind column appears only when some module is not a linear (older output unchanged).
    let show_kinds = kinds.iter().any(|k| k != "linear");
    let last = |b_dtype: &str, kind: &str| {
        if show_kinds {
            format!("{b_dtype:<7}  {kind}")
        } else {
            b_dtype.to_string()
        }
    };
    let _ = writeln!(
        out,
        "{:<width$}  {:>13}  {:>4}  {:>6}  {:<6}  {}",
        "module",
        "d_out x d_in",
        "rank",
        "stream",
        "A",
        last("B dtype", "kind")
    );
    for ((name, m), kind) in c.modules.iter().zip(&kinds) {
        let r = c.module_rank(m);
        let b_dtype = file
            .tensor(&lora_b_name(name))
            .map(|(info, _)| info.dtype.to_string())
            .unwrap_or_default();
        let streams = match m.experts {
            Some(e) if e > 1 => format!("{}+{}", m.stream, e - 1),
            _ => m.stream.to_string(),
        };
        let _ = writeln!(
            out,
            "{name:<width$}  {:>13}  {r:>4}  {streams:>6}  {:<6}  {}",
            format!("{} x {}", m.d_out, m.d_in),
            if m.a_stored { "stored" } else { "seeded" },
            last(&b_dtype, kind)
        );
    }
    let size = file.file_size();
    let classic = file.classic_lora_size();
    let _ = writeln!(out);
    let _ = writeln!(out, "file size   {} ({} bytes)", human_bytes(size), size);
    let _ = writeln!(
        out,
        "as LoRA     {} ({} bytes, every A stored in {}): this file is {:.3}x of it",
        human_bytes(classic),
        classic,
        c.a_dtype,
        size as f64 / classic as f64
    );
    out
}
