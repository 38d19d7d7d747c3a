//! Size estimates beyond the reference table, memory-limit parsing, model-type and policy names, and
//! the wrong-model-type message.

use modelpool::estimate::{params_from_name, weight_bytes_on_disk};
use modelpool::{
    EstimateSource, FileEstimator, FixedMemory, GB, Learned, MemoryLimit, ModelSpec, ModelType,
    NameEstimator, PolicyKind, PoolError, SizeEstimator,
};

fn est(name: &str) -> modelpool::Estimate {
    NameEstimator.estimate(&ModelSpec::new(name))
}

#[test]
fn parameter_counts_from_names() {
    assert_eq!(params_from_name("Qwen2.5-0.5B-Instruct"), Some((500_000_000, false)));
    assert_eq!(params_from_name("Qwen2.5-1.5B"), Some((1_500_000_000, false)));
    assert_eq!(params_from_name("SmolLM2-135M-Instruct"), Some((135_000_000, false)));
    assert_eq!(params_from_name("Mixtral-8x7B-v0.1"), Some((46_700_000_000, false)));
    assert_eq!(params_from_name("llama-3-8b"), Some((8_000_000_000, true)));
    // Version numbers and words are not sizes.
    assert_eq!(params_from_name("llama-3.1-instruct"), None);
    assert_eq!(params_from_name("bert-base"), None);
}

#[test]
fn decimal_and_million_sizes_scale_with_parameters() {
    let half = est("qwen2.5-0.5b-instruct");
    assert!(matches!(half.source, EstimateSource::Params { params: 500_000_000, .. }));
    assert_eq!(half.bytes, 312_500_000); // 0.625 bytes per parameter, the reference table's implied 4-bit rate
    let small = est("SmolLM2-135M");
    assert_eq!(small.bytes, 84_375_000);
}

#[test]
fn mixture_of_experts_names_count_shared_weights_once() {
    // Known shapes give their published totals, not experts x size (56B and 176B).
    assert_eq!(params_from_name("Mixtral-8x7B-Instruct-v0.1"), Some((46_700_000_000, false)));
    assert_eq!(params_from_name("mixtral-8x22b"), Some((141_000_000_000, false)));
    assert_eq!(params_from_name("WizardLM-2-8x22B"), Some((141_000_000_000, false)));
    // An unknown shape multiplies out: an upper bound.
    assert_eq!(params_from_name("tiny-moe-4x1.5b"), Some((6_000_000_000, false)));
    assert_eq!(params_from_name("moe-0x7b"), None);
    // A total followed by the active parameters counts the total, which a load holds.
    assert_eq!(params_from_name("Qwen3-30B-A3B"), Some((30_000_000_000, true)));

    // The README's row: 46.7B x 0.625 bytes, the reference table's implied 4-bit rate.
    let moe = est("mixtral-8x7b");
    assert_eq!(moe.bytes, 29_187_500_000);
    assert!(
        matches!(&moe.source, EstimateSource::Params { params: 46_700_000_000, quant, .. } if quant == "default-4bit")
    );
    // With a quantization hint: 4.5 bits per weight plus overhead, of the total.
    let q4 = est("mixtral-8x7b-instruct-4bit");
    assert_eq!(q4.bytes, (46.7e9 * 4.5 / 8.0 * 1.15_f64).round() as u64);
    // Still too large for a 24 GB pool, as traces/README.md says of the committed traces.
    assert!(q4.bytes > 24 * GB, "{}", q4.bytes);
}

#[test]
fn quantization_hints_scale_bytes_per_parameter() {
    let q4 = est("Meta-Llama-3-8B-Instruct-4bit").bytes;
    let q8 = est("Meta-Llama-3-8B-Instruct-8bit").bytes;
    let bf16 = est("Meta-Llama-3-8B-Instruct-bf16").bytes;
    let gguf = est("llama-3-8b-instruct.Q4_K_M.gguf").bytes;
    assert!(q4 < gguf && gguf < q8 && q8 < bf16, "{q4} {gguf} {q8} {bf16}");
    // bf16: 2 bytes per parameter plus 15% overhead.
    assert_eq!(bf16, 18_400_000_000);
    // 4-bit with MLX group scales: 4.5 bits per weight plus overhead.
    assert_eq!(q4, (8e9 * 4.5 / 8.0 * 1.15_f64).round() as u64);
    // A hint overrides the reference table even for a table size.
    assert!(matches!(est("mistral-7b-fp16").source, EstimateSource::Params { .. }));
}

#[test]
fn every_estimate_explains_itself() {
    for name in ["llama-3-8b", "qwen-0.5b-4bit", "mystery"] {
        let e = est(name);
        assert!(e.bytes > 0);
        assert!(!e.source.to_string().is_empty());
    }
    let hinted = NameEstimator.estimate(&ModelSpec::new("llama-70b").with_size(123));
    assert_eq!((hinted.bytes, hinted.source), (123, EstimateSource::SizeHint));
}

#[test]
fn file_estimator_sums_weight_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("model.safetensors"), vec![0u8; 1000]).unwrap();
    std::fs::write(dir.join("sub/extra.gguf"), vec![0u8; 600]).unwrap();
    std::fs::write(dir.join("README.md"), vec![0u8; 5000]).unwrap();
    assert_eq!(weight_bytes_on_disk(&dir).unwrap(), 1600);
    let fe = FileEstimator::default();
    let e = fe.estimate(&ModelSpec::new("x-7b").with_path(&dir));
    assert_eq!(e.bytes, 2000);
    assert!(matches!(e.source, EstimateSource::Files { bytes_on_disk: 1600, .. }));
    // No path, or a missing one: the name decides.
    assert_eq!(fe.estimate(&ModelSpec::new("x-7b")).bytes, 4 * GB);
    assert_eq!(fe.estimate(&ModelSpec::new("x-7b").with_path(dir.join("nope"))).bytes, 4 * GB);
}

#[test]
fn learned_estimator_remembers_measurements_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("learned.json");
    let spec = ModelSpec::new("llama-3-8b");
    {
        let l = Learned::with_file(NameEstimator, &file).unwrap();
        assert_eq!(l.estimate(&spec).bytes, 5 * GB);
        l.observe(&spec, 5_600_000_000);
        assert_eq!(
            l.estimate(&spec),
            modelpool::Estimate { bytes: 5_600_000_000, source: EstimateSource::Measured }
        );
    }
    let l = Learned::with_file(NameEstimator, &file).unwrap();
    assert_eq!(l.estimate(&spec).bytes, 5_600_000_000);
}

#[test]
fn a_corrupt_or_truncated_sizes_file_is_ignored_and_rewritten_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("sizes.json");
    let (a, b) = (ModelSpec::new("llama-3-8b"), ModelSpec::new("mistral-7b"));
    {
        let l = Learned::with_file(NameEstimator, &file).unwrap();
        l.observe(&a, 5_600_000_000);
        l.observe(&b, 4_200_000_000);
    }
    let whole = std::fs::read(&file).unwrap();
    // Every proper prefix (a crash mid-write without the rename) and other garbage is ignored:
    // estimates fall back to the names, nothing fails.
    let garbage: Vec<Vec<u8>> = (0..whole.len())
        .map(|n| whole[..n].to_vec())
        .chain([b"not json".to_vec(), b"{\"llama-3-8b\": -1}".to_vec(), b"[1,2]".to_vec(), vec![0xff; 16]])
        .collect();
    for g in garbage {
        std::fs::write(&file, &g).unwrap();
        let l = Learned::with_file(NameEstimator, &file)
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&g)));
        assert!(l.measurements().is_empty());
        assert_eq!(l.estimate(&a).bytes, 5 * GB);
        // The next measurement rewrites the file whole and valid.
        l.observe(&b, 4_300_000_000);
        let back: std::collections::BTreeMap<String, u64> =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(back, [("mistral-7b".to_string(), 4_300_000_000)].into());
    }
    // No temporary file is left beside it.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["sizes.json"]);
    // A file that exists but cannot be read (a directory here) is still an error.
    let err = Learned::with_file(NameEstimator, tmp.path()).unwrap_err();
    assert!(err.to_string().contains("cannot read size file"), "{err}");
}

#[test]
fn an_atomic_write_replaces_the_file_and_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.json");
    modelpool::estimate::write_atomically(&file, b"one").unwrap();
    modelpool::estimate::write_atomically(&file, b"two").unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"two");
    // Into a directory that does not exist: an error, nothing created.
    let missing = tmp.path().join("no/such/f.json");
    assert!(modelpool::estimate::write_atomically(&missing, b"x").is_err());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn memory_limits_parse_and_reject_nonsense() {
    let ok = [
        ("75%", MemoryLimit::Fraction(0.75)),
        ("0.75", MemoryLimit::Fraction(0.75)),
        ("100%", MemoryLimit::Fraction(1.0)),
        ("16GB", MemoryLimit::Bytes(16_000_000_000)),
        ("16gb", MemoryLimit::Bytes(16_000_000_000)),
        ("16GiB", MemoryLimit::Bytes(16 * 1024 * 1024 * 1024)),
        ("512MB", MemoryLimit::Bytes(512_000_000)),
        ("1.5 GB", MemoryLimit::Bytes(1_500_000_000)),
    ];
    for (s, want) in ok {
        assert_eq!(s.parse::<MemoryLimit>(), Ok(want), "{s}");
    }
    for bad in ["-5%", "150%", "abc", "0", "0GB", "", "12", "16XB", "nan%", "-1GB"] {
        let err = bad.parse::<MemoryLimit>().unwrap_err();
        assert!(err.to_string().contains("invalid memory limit"), "{bad}: {err}");
    }
    assert_eq!(MemoryLimit::Fraction(0.25).resolve(&FixedMemory(24 * GB)), 6 * GB);
}

#[test]
fn model_types_and_policies_by_name() {
    for t in ModelType::ALL {
        assert_eq!(t.as_str().parse::<ModelType>(), Ok(t));
        assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", t.as_str()));
    }
    let err = "chat".parse::<ModelType>().unwrap_err();
    assert_eq!(err.to_string(), "unknown model type 'chat': expected one of text-gen, vision, embeddings");
    assert!(serde_json::from_str::<ModelType>("\"image\"").is_err());
    for p in PolicyKind::ALL {
        assert_eq!(p.as_str().parse::<PolicyKind>(), Ok(p));
        assert_eq!(p.build().name(), p.as_str());
    }
    assert!("fifo".parse::<PolicyKind>().unwrap_err().to_string().contains("lru, gdsf, lfu"));
}

#[test]
fn wrong_type_messages_use_the_right_article() {
    use ModelType::{Embeddings, TextGen, Vision};
    let msg =
        |actual, expected| PoolError::WrongModelType { model: "m".into(), expected, actual }.to_string();
    assert_eq!(
        msg(Embeddings, TextGen),
        "model 'm' is an embeddings model; this endpoint needs a text-gen model"
    );
    assert_eq!(
        msg(TextGen, Embeddings),
        "model 'm' is a text-gen model; this endpoint needs an embeddings model"
    );
    assert_eq!(
        msg(Vision, Embeddings),
        "model 'm' is a vision model; this endpoint needs an embeddings model"
    );
    assert_eq!(
        msg(Embeddings, Vision),
        "model 'm' is an embeddings model; this endpoint needs a vision model"
    );
}
