//! Any bytes as `adapter_config.json` next to valid LoRA weights: never a panic, an
//! error is one line.
#![no_main]

use std::collections::BTreeMap;

use asymlora_core::adapter::OwnedTensor;
use asymlora_core::io::write_safetensors;
use asymlora_core::peft::PeftAdapter;
use libfuzzer_sys::fuzz_target;

fn zeros(name: &str, shape: &[usize]) -> (String, OwnedTensor) {
    let n: usize = shape.iter().product();
    let t = OwnedTensor::new(name, safetensors::Dtype::F32, shape.to_vec(), vec![0; n * 4]).unwrap();
    (name.to_string(), t)
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let tensors = BTreeMap::from([
        zeros("base_model.model.layer.q.lora_A.weight", &[2, 4]),
        zeros("base_model.model.layer.q.lora_B.weight", &[3, 2]),
    ]);
    write_safetensors(dir.path().join("adapter_model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), data).unwrap();
    if let Err(e) = PeftAdapter::open(dir.path()) {
        assert!(!e.to_string().contains('\n'));
    }
});
