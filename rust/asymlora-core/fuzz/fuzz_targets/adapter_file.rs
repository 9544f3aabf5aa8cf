//! Any bytes as an adapter file: opened, and when valid, every factor read (a
//! generated `A` only when small, as the property tests do). Never a panic.
#![no_main]

use asymlora_core::adapter::{render_inspect, AdapterFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    std::fs::write(&path, data).unwrap();
    let Ok(file) = AdapterFile::open(&path) else { return };
    let _ = render_inspect(&file);
    let _ = file.classic_lora_size();
    let config = file.config().clone();
    for (name, m) in &config.modules {
        let _ = file.lora_b(name);
        if m.a_stored || config.module_rank(m) * m.d_in <= 1 << 16 {
            let _ = file.lora_a(name);
        }
    }
});
