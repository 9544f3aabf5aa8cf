//! Any text as an `ADAPTER:WEIGHT` argument, an `OLD=NEW` prefix map and a PEFT
//! pattern key: parsed or refused on one line.
#![no_main]

use asymlora_core::merge::{parse_prefix_map, AdapterInput};
use asymlora_core::peft::PatternRule;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = AdapterInput::parse(text) {
        assert!(!e.to_string().contains('\n'));
    }
    if let Err(e) = parse_prefix_map(text) {
        assert!(!e.to_string().contains('\n'));
    }
    match PatternRule::new([text]) {
        Ok(rule) => {
            let _ = rule.first_match("model.layers.0.self_attn.q_proj");
        }
        Err(bad) => assert!(!bad.message.contains('\n')),
    }
});
