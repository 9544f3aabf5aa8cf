//! Any text as the asymlora config JSON: parsed, then checked on its own. An error is
//! one line.
#![no_main]

use asymlora_core::adapter::{validate_config, AdapterConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match AdapterConfig::from_json(text) {
        Ok(config) => {
            if let Err(e) = validate_config("fuzz", &config) {
                assert!(!e.to_string().contains('\n'));
            }
        }
        Err(message) => assert!(!message.contains('\n')),
    }
});
