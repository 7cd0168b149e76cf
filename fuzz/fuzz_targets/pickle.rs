//! Pickles, read and never run: `attest::pickle`'s opcode reader (`Ops`, protocols 0 to 5),
//! `analyze` (globals named through the stack and memo, picklescan's and modelscan's verdicts),
//! `analyze_npy` and `analyze_zip` (members of a torch.save zip or an .npz), the restricted
//! unpickler `pickle::state_dict::read_state_dict`, and, for a zip, `sanctum import pickle`
//! (`runner::import::pickle::import_pickle`) from a scratch file into a scratch directory.

#![no_main]

use std::io::Cursor;

use attest::pickle::state_dict::read_state_dict;
use attest::pickle::{Ops, analyze, analyze_npy, analyze_zip};
use libfuzzer_sys::fuzz_target;
use runner::import::pickle::import_pickle;

fuzz_target!(|data: &[u8]| {
    let mut ops = Ops::new(data);
    while let Ok(Some(_)) = ops.next_op() {}
    if let Ok(analysis) = analyze(data) {
        let _ = analysis.verdict();
    }
    let _ = analyze_npy(data);
    if let Ok(members) = analyze_zip(Cursor::new(data)) {
        for (_, analysis) in members {
            let _ = analysis.verdict();
        }
    }
    let _ = read_state_dict(data);
    // The import reads a checkpoint from disk: a torch.save zip, or a legacy pickle.
    if data.starts_with(b"PK") || data.first() == Some(&0x80) {
        let scratch = sanctum_fuzz::scratch();
        let input = scratch.path().join("pytorch_model.bin");
        if std::fs::write(&input, data).is_ok() {
            let _ = import_pickle(&input, &scratch.path().join("out"));
        }
    }
});
