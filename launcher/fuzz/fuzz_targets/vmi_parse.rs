//! A VirtualMachineInstance's text (YAML or JSON) through podvm's parser and mapping, with
//! a made-up host (no file system). Entry point: `launcher::vmi::fuzzing::fuzz_vmi`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    launcher::vmi::fuzzing::fuzz_vmi(data);
});
