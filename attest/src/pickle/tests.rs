//! Fixtures are real pickles written by Python's `pickle` (fixtures/make.py).

use std::io::{Cursor, Read};

use proptest::prelude::*;

use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/pickle/fixtures/",
            $name
        ))
        .as_slice()
    };
}

const PLAIN: [&[u8]; 6] = [
    fixture!("plain_p0.pkl"),
    fixture!("plain_p1.pkl"),
    fixture!("plain_p2.pkl"),
    fixture!("plain_p3.pkl"),
    fixture!("plain_p4.pkl"),
    fixture!("plain_p5.pkl"),
];

const OS_SYSTEM: [&[u8]; 6] = [
    fixture!("os_system_p0.pkl"),
    fixture!("os_system_p1.pkl"),
    fixture!("os_system_p2.pkl"),
    fixture!("os_system_p3.pkl"),
    fixture!("os_system_p4.pkl"),
    fixture!("os_system_p5.pkl"),
];

fn run(bytes: &[u8]) -> Analysis {
    analyze(bytes).unwrap()
}

fn names(analysis: &Analysis) -> Vec<String> {
    analysis
        .globals
        .iter()
        .map(|g| format!("{}.{}", g.module, g.name))
        .collect()
}

#[test]
fn plain_data_at_every_protocol_is_safe() {
    for (protocol, bytes) in PLAIN.iter().enumerate() {
        let analysis = run(bytes);
        assert_eq!(analysis.malformed, None, "protocol {protocol}");
        assert_eq!(analysis.pickles, 1);
        // Before protocol 3, `bytes` are written as a call to `_codecs.encode`.
        let want: &[&str] = if protocol < 3 {
            &["_codecs.encode"]
        } else {
            &[]
        };
        assert_eq!(names(&analysis), want, "protocol {protocol}");
        assert_eq!(analysis.verdict(), Verdict::Safe);
        let declared = (protocol >= 2).then_some(protocol as u8);
        assert_eq!(analysis.protocol, declared);
    }
}

#[test]
fn os_system_is_dangerous_and_invoked_at_every_protocol() {
    for (protocol, bytes) in OS_SYSTEM.iter().enumerate() {
        let analysis = run(bytes);
        assert_eq!(analysis.malformed, None, "protocol {protocol}");
        assert_eq!(names(&analysis), ["posix.system"], "protocol {protocol}");
        let global = &analysis.globals[0];
        assert_eq!(global.verdict, Verdict::Dangerous);
        assert!(global.invoked, "protocol {protocol}");
        let opcode = if protocol >= 4 {
            "STACK_GLOBAL"
        } else {
            "GLOBAL"
        };
        assert_eq!(global.opcode, opcode);
        assert_eq!(analysis.verdict(), Verdict::Dangerous);
    }
}

#[test]
fn subprocess_eval_and_memoized_stack_globals_are_found() {
    assert_eq!(names(&run(fixture!("popen_p4.pkl"))), ["subprocess.Popen"]);
    // Protocol 2 names builtins by their Python 2 module.
    assert_eq!(names(&run(fixture!("eval_p2.pkl"))), ["__builtin__.eval"]);
    let memo = run(fixture!("memo_p4.pkl"));
    assert_eq!(memo.malformed, None);
    assert_eq!(names(&memo), ["posix.system", "collections.OrderedDict"]);
    assert_eq!(memo.verdict(), Verdict::Dangerous);
}

#[test]
fn torch_state_dicts_are_safe_plain_in_zips_and_legacy() {
    let data = run(fixture!("torch_data.pkl"));
    assert_eq!(data.malformed, None);
    assert_eq!(
        names(&data),
        [
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch.FloatStorage"
        ]
    );
    assert_eq!(data.verdict(), Verdict::Safe);

    let members = analyze_zip(Cursor::new(fixture!("torch_benign.zip"))).unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].0, "archive/data.pkl");
    assert_eq!(members[0].1.verdict(), Verdict::Safe);
    let evil = analyze_zip(Cursor::new(fixture!("torch_os_system.zip"))).unwrap();
    assert_eq!(evil[0].1.verdict(), Verdict::Dangerous);
    assert!(names(&evil[0].1).contains(&"posix.system".to_string()));

    // Five pickles, then raw storage bytes that end the walk without being a finding.
    let legacy = run(fixture!("torch_legacy.bin"));
    assert_eq!(legacy.malformed, None);
    assert_eq!(legacy.pickles, 5);
    assert_eq!(legacy.verdict(), Verdict::Safe);
}

#[test]
fn every_truncation_is_a_finding_never_a_panic() {
    let all: Vec<&[u8]> = PLAIN
        .iter()
        .chain(OS_SYSTEM.iter())
        .copied()
        .chain([fixture!("torch_data.pkl"), fixture!("memo_p4.pkl")])
        .collect();
    for bytes in all {
        let whole = run(bytes);
        for cut in 0..bytes.len() {
            let analysis = run(&bytes[..cut]);
            assert!(analysis.malformed.is_some(), "cut at {cut} of {bytes:?}");
            assert!(analysis.globals.len() <= whole.globals.len());
            assert!(analysis.verdict() >= Verdict::Unknown);
        }
    }
}

#[test]
fn hostile_streams_stay_bounded() {
    // An unknown opcode.
    let bad = run(b"\x80\x04\xff.");
    assert!(
        bad.malformed
            .as_deref()
            .unwrap()
            .contains("unknown opcode 0xff"),
        "{bad:?}"
    );
    // BINBYTES8 announcing 2^64-1 bytes: read past, never allocated; the stream ends first.
    let mut huge = b"\x80\x04\x8e".to_vec();
    huge.extend(u64::MAX.to_le_bytes());
    assert!(run(&huge).malformed.unwrap().contains("ends first"));
    // A million MARKs: the stack cap ends the walk.
    let mut marks = b"\x80\x04".to_vec();
    marks.extend(std::iter::repeat_n(b'(', 1_000_000));
    assert!(run(&marks).malformed.unwrap().contains("deeper than"));
    // A GLOBAL line without end, and a protocol 0 STRING line longer than is kept: read past,
    // and what follows is still judged.
    let mut line = b"c".to_vec();
    line.extend(std::iter::repeat_n(b'a', 100_000));
    assert!(run(&line).malformed.unwrap().contains("inside a line"));
    let mut long = b"S'".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100_000));
    long.extend(b"'\n0cposix\nsystem\n(tR.");
    let analysis = run(&long);
    assert_eq!(analysis.malformed, None, "{analysis:?}");
    assert_eq!(names(&analysis), ["posix.system"]);
    // A large kept-out payload is skipped, and what follows is still judged.
    let mut big = b"\x80\x04\x8e".to_vec();
    big.extend((200_000u64).to_le_bytes());
    big.extend(vec![0u8; 200_000]);
    big.extend(b"0\x8c\x05posix\x8c\x06system\x93N\x85R.");
    let analysis = run(&big);
    assert_eq!(analysis.malformed, None, "{analysis:?}");
    assert_eq!(names(&analysis), ["posix.system"]);
    assert!(analysis.globals[0].invoked);
}

#[test]
fn unresolvable_stack_globals_and_extensions_are_dangerous() {
    // STACK_GLOBAL whose module is an integer, and one fed by a memo entry that was never put.
    let analysis = run(b"\x80\x04K\x01\x8c\x06system\x93.");
    assert_eq!(names(&analysis), ["unknown.system"]);
    assert_eq!(analysis.verdict(), Verdict::Dangerous);
    let analysis = run(b"\x80\x04h\x07\x8c\x06system\x93.");
    assert_eq!(analysis.verdict(), Verdict::Dangerous);
    let analysis = run(b"\x80\x02\x82\x01.");
    assert_eq!(analysis.globals[0].opcode, "EXT1");
    assert_eq!(analysis.verdict(), Verdict::Dangerous);
}

#[test]
fn verdicts_follow_picklescan_and_modelscan() {
    for (module, name) in [
        ("posix", "system"),
        ("os", "anything"),
        ("builtins", "eval"),
        ("__builtin__", "__import__"),
        ("subprocess", "check_output"),
        ("commands", "getoutput"),
        ("runpy", "_run_code"),
        ("socket", "create_connection"),
        ("ctypes.util", "find_library"),
        ("functools", "partial"),
        ("torch.serialization", "load"),
        ("aiohttp.client", "ClientSession"),
        ("numpy.testing._private.utils", "runstring"),
        ("test.support.script_helper", "assert_python_ok"),
    ] {
        assert_eq!(verdict(module, name), Verdict::Dangerous, "{module}.{name}");
    }
    for (module, name) in [
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch", "BFloat16Storage"),
        ("numpy.core.multiarray", "_reconstruct"),
    ] {
        assert_eq!(verdict(module, name), Verdict::Safe, "{module}.{name}");
    }
    assert_eq!(verdict("functools", "reduce"), Verdict::Unknown);
    assert_eq!(verdict("builtins", "set"), Verdict::Unknown);
    assert_eq!(verdict("oss", "system"), Verdict::Unknown);
}

#[test]
fn protocol_zero_text_arguments_decode() {
    let mut ops = Ops::new(&b"S'a\\'b\\x41'\nVcaf\\u00e9\nI01\nL123L\nF1.5\n."[..]);
    let mut args = Vec::new();
    while let Some(op) = ops.next_op().unwrap() {
        args.push(op.arg);
    }
    assert_eq!(
        args,
        [
            Arg::Str("a'bA".into()),
            Arg::Str("café".into()),
            Arg::Int(1),
            Arg::Int(123),
            Arg::Float(1.5),
            Arg::None
        ]
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let analysis = analyze(bytes.as_slice()).unwrap();
        prop_assert!(analysis.globals.len() <= MAX_GLOBALS);
        let _ = analyze_zip(Cursor::new(bytes));
    }

    #[test]
    fn arbitrary_tails_after_a_pickle_prefix_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00".to_vec();
        bytes.extend(tail);
        analyze(bytes.as_slice()).unwrap();
    }
}

mod state_dicts {
    use super::super::state_dict::{Dtype, StateDictError, read_state_dict};
    use super::*;

    fn data_pkl(zip: &[u8]) -> Vec<u8> {
        let mut archive = zip::ZipArchive::new(Cursor::new(zip)).unwrap();
        let mut member = archive.by_name("archive/data.pkl").unwrap();
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn a_torch_state_dict_reads_as_tensor_references() {
        let dict = read_state_dict(fixture!("torch_data.pkl")).unwrap();
        let names: Vec<_> = dict.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["linear.weight", "linear.bias"]);
        let weight = &dict.tensors[0];
        assert_eq!(weight.storage, "0");
        assert_eq!(weight.dtype, Dtype::F32);
        assert_eq!((weight.storage_numel, weight.offset), (4, 0));
        assert_eq!(
            (weight.shape.as_slice(), weight.stride.as_slice()),
            (&[4][..], &[1][..])
        );
        assert!(dict.skipped.is_empty());
        let zipped = read_state_dict(data_pkl(fixture!("torch_benign.zip")).as_slice()).unwrap();
        assert_eq!(zipped, dict);
    }

    #[test]
    fn any_other_global_is_refused_by_name() {
        let evil = data_pkl(fixture!("torch_os_system.zip"));
        match read_state_dict(evil.as_slice()) {
            Err(StateDictError::Refused { global, .. }) => assert_eq!(global, "posix.system"),
            other => panic!("{other:?}"),
        }
        for bytes in OS_SYSTEM {
            let refused = read_state_dict(bytes);
            assert!(
                matches!(refused, Err(StateDictError::Refused { .. })),
                "{refused:?}"
            );
        }
        // Plain data is no state dict: refused as such, not read as one.
        assert!(matches!(
            read_state_dict(PLAIN[4]),
            Err(StateDictError::Unexpected { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = fixture!("torch_data.pkl");
        for cut in 0..bytes.len() {
            assert!(read_state_dict(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_state_dict(bytes.as_slice());
        }
    }
}
