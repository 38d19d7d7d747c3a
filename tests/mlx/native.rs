//! MLX-native model directories (issue 17): mlx-community style safetensors directories made by
//! `scripts/setup-mlx-models.sh` (mlx-lm's converter on the SmolLM2 GGUF, plus tiny random
//! checkpoints of other families) checked against mlx-lm's own outputs on the same directories
//! (`tests/fixtures/mlx_reference.json`, written by `scripts/make-mlx-models.py --reference`,
//! float parameters upcast to float32).
//!
//! Tolerances: SmolLM2 first-step logits within 1e-3 (absolute; values 13-31; measured at most 5e-5) of mlx-lm's;
//! tiny random models within 1e-3 at every sampled logit. Greedy ids equal mlx-lm's up to
//! the first step whose reference margin is below 0.05 (a near tie either side may take).

use super::*;

fn mlx_dir(name: &str) -> PathBuf {
    let d = models_dir().join("mlx").join(name);
    assert!(d.join("config.json").is_file(), "{} missing: run scripts/setup-mlx-models.sh", d.display());
    d
}

fn dir_spec(name: &str) -> ModelSpec {
    ModelSpec::new(name).with_path(mlx_dir(name))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Greedy ids must agree up to (and including) the first step whose reference margin is below
/// `min_margin`; returns how many were compared.
fn assert_greedy_prefix(what: &str, got: &[u32], want: &[u32], margins: &[f64], min_margin: f64) -> usize {
    let n = margins.iter().position(|&m| m < min_margin).map_or(want.len(), |i| i + 1);
    assert_eq!(&got[..n], &want[..n], "{what}: greedy ids (first {n}); got {got:?}, want {want:?}");
    n
}

fn prompt_of(item: &Value) -> Prompt {
    if item["kind"] == "chat" {
        Prompt::Chat(
            item["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| ChatMessage::text(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect(),
        )
    } else {
        Prompt::Text(item["prompt"].as_str().unwrap().into())
    }
}

/// Every SmolLM2 directory (f32 Hugging Face, bf16, bf16 in three shards, 8-bit, 4-bit and
/// mlx-lm's mixed 3/6-bit recipe), dequantized to f32: the chat template and tokenizer give
/// mlx-lm's input ids exactly, first-step logits are within 1e-3 of mlx-lm's, greedy ids agree
/// up to the first near tie, and the measured bytes equal the size hint from the headers.
#[tokio::test]
async fn safetensors_directories_match_mlx_lm() {
    let reference = fixture("mlx_reference.json");
    let models = reference["models"].as_object().unwrap();
    let mut report = Vec::new();
    for (label, entry) in models.iter().filter(|(l, _)| !l.starts_with("tiny-")) {
        let spec = dir_spec(entry["dir"].as_str().unwrap());
        let model = backend().load_model(&spec).await.unwrap_or_else(|e| panic!("{label}: {e}"));
        let h: Arc<dyn ModelHandle> = model.clone();
        let hint = mlx_resident_estimate(&spec, true).unwrap();
        let measured = h.measured_bytes();
        assert!(
            hint.abs_diff(measured) as f64 <= 0.01 * measured as f64,
            "{label}: hint {hint} vs {measured}"
        );
        // SmolLM2 135M: 30 layers x 3 KV heads x head dim 64 x (K, V) x f32, as the catalogue
        // reads it from the config before loading.
        assert_eq!(h.kv_bytes_per_token(), Some(46_080), "{label}");
        let config = modelpool::catalog::read_config(&mlx_dir(entry["dir"].as_str().unwrap())).unwrap();
        assert_eq!(modelpool::catalog::kv_bytes_per_token_of_config(&config), Some(46_080), "{label}");
        let mut worst = 0f64;
        for item in entry["items"].as_array().unwrap() {
            let want = ids(&item["greedy_ids"]);
            let top = ids(&item["first_step_top5"]["ids"]);
            let probe = model.probe(prompt_of(item), want.len(), top.clone()).await.unwrap();
            assert_eq!(probe.input_ids, ids(&item["input_ids"]), "{label}: input ids");
            for (g, w) in probe.first_logits.iter().zip(floats(&item["first_step_top5"]["logits"])) {
                worst = worst.max((g - w).abs());
                assert!((g - w).abs() <= 1e-3, "{label}: first-step logit {g} vs mlx-lm {w}");
            }
            let margins = floats(&item["greedy_step_margins"]);
            assert_greedy_prefix(label, &probe.greedy_ids, &want, &margins, 0.05);
        }
        report.push(format!("{label}: max |logit - mlx-lm| {worst:.5}, {measured} bytes"));
        h.unload().await.unwrap();
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(report.len(), 6, "six SmolLM2 directories in the reference");
}

/// Tiny random-weight checkpoints written with mlx-lm's own classes (Qwen2 with attention
/// biases, Qwen3 with q/k norms and an untied head, Mistral, Llama 3 with `rope_scaling`
/// `llama3`; Gemma 2 with soft-capping, GeGLU, (1 + w) norms, pre/post feed-forward norms and
/// a window of 16 on its even layers; Gemma 3 text with q/k norms, local layers (window 8,
/// their own RoPE base) and global ones with linear `rope_scaling`, tied head; Phi-3 with fused
/// qkv / gate-up, partial rotary and `longrope`; Mistral with `layer_types` and a window of 8),
/// on fixed ids (12, and for the windowed ones also 300, far past their windows): logits within
/// 1e-3 of mlx-lm's at the top 5 and at every 997th id, greedy ids equal up to a near tie; the
/// size hint from the headers equals the bytes loaded.
#[tokio::test]
async fn tiny_families_match_mlx_lm_logits() {
    let reference = fixture("mlx_reference.json");
    let models = reference["models"].as_object().unwrap();
    let mut families = Vec::new();
    let mut long = 0;
    for (label, entry) in models.iter().filter(|(l, _)| l.starts_with("tiny-")) {
        let spec = dir_spec(entry["dir"].as_str().unwrap());
        let model = backend().load_model(&spec).await.unwrap();
        let (hint, measured) = (mlx_resident_estimate(&spec, true).unwrap(), model.measured_bytes());
        assert_eq!(hint, measured, "{label}: the size hint is what the backend holds");
        let mut worst = 0f64;
        for item in entry["items"].as_array().unwrap() {
            let input = ids(&item["input_ids"]);
            let what = format!("{label} ({} ids)", input.len());
            long += usize::from(input.len() > 128);
            let top = ids(&item["first_step_top5"]["ids"]);
            let sample = floats(&item["first_step_sample"]);
            let mut logit_ids = top.clone();
            logit_ids.extend((0..sample.len() as u32).map(|i| i * 997));
            let want_ids = ids(&item["greedy_ids"]);
            let probe = model.probe_ids(input, want_ids.len(), logit_ids).await.unwrap();
            let mut want = floats(&item["first_step_top5"]["logits"]);
            want.extend(sample);
            for (i, (g, w)) in probe.first_logits.iter().zip(&want).enumerate() {
                worst = worst.max((g - w).abs());
                assert!((g - w).abs() <= 1e-3, "{what}: logit #{i} {g} vs mlx-lm {w}");
            }
            assert_greedy_prefix(
                &what,
                &probe.greedy_ids,
                &want_ids,
                &floats(&item["greedy_step_margins"]),
                0.05,
            );
        }
        eprintln!("{label}: max |logit - mlx-lm| {worst:.6}");
        families.push(label.clone());
    }
    assert_eq!(
        families,
        [
            "tiny-gemma2",
            "tiny-gemma3_text",
            "tiny-llama3",
            "tiny-mistral",
            "tiny-mistral-swa",
            "tiny-phi3",
            "tiny-qwen2",
            "tiny-qwen3"
        ]
    );
    assert_eq!(long, 3, "the three windowed families on the 300-id sequence");
}

/// Sliding-window layers through the serving path (chunked prefill, batched decode): for each
/// windowed tiny family, greedy generations of a prompt of more than 300 tokens (three prefill
/// chunks of 128, each past the windows of 8 and 16, so the chunks' masks are causal and
/// windowed at an offset) and of two short prompts, first one at a time, then all three
/// together (decoded in one batch), give the same text; and the long one's text is the
/// probe's (the whole prompt in one forward pass, then single-sequence decode, which the test
/// above checks against mlx-lm).
#[tokio::test]
async fn windowed_families_batched_and_chunked_equal_one_pass() {
    let long = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(24);
    let prompts: Vec<(String, u32)> =
        vec![(long.clone(), 20), ("Hello there, how are you?".into(), 24), ("One two three".into(), 12)];
    for name in ["tiny-gemma2", "tiny-gemma3_text", "tiny-mistral-swa"] {
        let model = backend().load_model(&dir_spec(name)).await.unwrap();
        let h: Arc<dyn ModelHandle> = model.clone();
        let probe = model.probe(Prompt::Text(long.clone()), 20, vec![]).await.unwrap();
        assert!(probe.input_ids.len() > 300, "{name}: {} prompt tokens", probe.input_ids.len());
        let req = |p: &str, n: u32| GenerateRequest::greedy(Prompt::Text(p.to_string()), n);
        let mut solo = Vec::new();
        for (p, n) in &prompts {
            solo.push(collect(&h, req(p, *n)).await);
        }
        assert_eq!(solo[0].0, probe.greedy_text, "{name}: chunked prefill equals one pass");
        assert!(!solo[0].0.is_empty(), "{name}: the long prompt generated text");
        let tasks: Vec<_> = prompts
            .iter()
            .map(|(p, n)| {
                let (h, r) = (h.clone(), req(p, *n));
                tokio::spawn(async move { collect(&h, r).await })
            })
            .collect();
        for (t, want) in tasks.into_iter().zip(&solo) {
            let got = t.await.unwrap();
            assert_eq!((&got.0, got.2, got.3, got.4), (&want.0, want.2, want.3, want.4), "{name}");
        }
        assert!(model.peak_batch() >= 2, "{name}: decoded together (peak batch {})", model.peak_batch());
        h.unload().await.unwrap();
    }
}

/// The quantized path (MLX's quantized matmul, weights kept packed): the 4-bit directory
/// continues the raw prompt with " Paris", and holds what the size hint says.
#[tokio::test]
async fn four_bit_directory_kept_quantized() {
    let spec = dir_spec("SmolLM2-135M-Instruct-4bit");
    let b = MlxBackend::new(MlxOptions { dequantize: false, ..MlxOptions::default() });
    let h = b.load(&spec).await.unwrap();
    let hint = mlx_resident_estimate(&spec, false).unwrap();
    assert!(
        hint.abs_diff(h.measured_bytes()) as f64 <= 0.01 * hint as f64,
        "{hint} vs {}",
        h.measured_bytes()
    );
    assert!(h.measured_bytes() < 150_000_000, "{}", h.measured_bytes());
    let (text, ..) =
        collect(&h, GenerateRequest::greedy(Prompt::Text("The capital of France is".into()), 2)).await;
    assert!(text.starts_with(" Paris"), "{text:?}");
    h.unload().await.unwrap();
}

/// Streaming chat on the 8-bit directory through the normal generation path: the model's own
/// Jinja template, its tokenizer.json, and generation_config.json's eos id stop the answer.
#[tokio::test]
async fn eight_bit_directory_answers_the_chat_question() {
    let h = backend().load(&dir_spec("SmolLM2-135M-Instruct-8bit")).await.unwrap();
    let q = vec![ChatMessage::text("user", "What is the capital of France?")];
    let (text, _, finish, _, _) = collect(&h, GenerateRequest::greedy(Prompt::Chat(q), 32)).await;
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(finish, FinishReason::Stop);
    h.unload().await.unwrap();
}

/// A copy of the MLX directory `name` to break: files copied, or with `link_weights` the
/// safetensors files symlinked (as in the Hugging Face cache).
fn copy_of(name: &str, link_weights: bool) -> (tempfile::TempDir, PathBuf) {
    let src = mlx_dir(name);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    std::fs::create_dir(&d).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let to = d.join(p.file_name().unwrap());
        if link_weights && p.extension().is_some_and(|x| x == "safetensors") {
            std::os::unix::fs::symlink(&p, &to).unwrap();
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
    (tmp, d)
}

fn edit_config(d: &std::path::Path, f: impl FnOnce(&mut Value)) {
    let p = d.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Breaks a copied model directory.
type Breaker = Box<dyn Fn(&std::path::Path)>;

/// Bad directories fail the load with a message naming the file or field, and through the
/// pool the ledger is left empty.
#[tokio::test]
async fn bad_directories_are_clear_load_errors_and_leave_the_ledger_unchanged() {
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "unknown architecture",
            Box::new(|d| edit_config(d, |v| v["model_type"] = "mamba".into())),
            "unsupported model_type 'mamba' (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3)",
        ),
        (
            "missing tokenizer",
            Box::new(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap()),
            "tokenizer.json is missing",
        ),
        (
            "truncated safetensors",
            Box::new(|d| {
                let p = d.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            "model.safetensors: the header describes",
        ),
        (
            "shard missing from the index",
            Box::new(|d| {
                let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}});
                std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
            }),
            "shard model-00002-of-00002.safetensors listed in",
        ),
    ];
    for (what, breaks, expect) in cases {
        let (_tmp, d) = copy_of("tiny-qwen2", false);
        breaks(&d);
        let pool = lru_pool();
        pool.register(ModelSpec::new("broken").with_path(&d));
        let err = pool.acquire("broken").await.err().unwrap_or_else(|| panic!("{what}: loaded"));
        let msg = err.to_string();
        assert!(msg.contains(expect), "{what}: {msg}");
        assert_eq!(pool.status().ledger.used(), 0, "{what}");
    }

    // A quantization block inconsistent with the tensors: the 4-bit directory told it is 8-bit.
    let (_tmp, d) = copy_of("SmolLM2-135M-Instruct-4bit", true);
    edit_config(&d, |v| v["quantization"]["bits"] = 8.into());
    let err = backend().load(&ModelSpec::new("q").with_path(&d)).await.err().unwrap().to_string();
    assert!(
        err.contains("config.json quantization (bits 8, group_size 64) does not match the tensors of model.embed_tokens"),
        "{err}"
    );
}

/// Issue 17: a catalogued mlx-community directory served end to end over the OpenAI API: the
/// catalogue reads its KV rate (and context) from `config.json` before loading, the first chat
/// request loads it (`x-modelpool-admission: load`) and answers what the backend's own greedy
/// decode gives for the same messages, `/admin/pool` then shows its measured size and the
/// model's own KV figure, and `/v1/models` lists it under its directory name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_model_is_served_over_the_openai_api() {
    let id = "SmolLM2-135M-Instruct-8bit";
    let specs = modelpool::catalog::scan_models_dir(&models_dir().join("mlx")).unwrap();
    assert!(specs.iter().any(|s| &*s.id == id), "{id} in models/mlx (scripts/setup-mlx-models.sh)");
    let pool = lru_pool();
    for s in specs {
        pool.register(s);
    }
    assert_eq!(pool.with_state(|st| st.kv_bytes_per_token(st.slot(id).unwrap())), 46_080, "from config.json");
    let state = modelpool::http::AppState::new(pool.clone(), Arc::new(modelpool::http::Metrics::new()));
    let routes = modelpool::http::routes(state);
    let question = "What is the capital of France?";
    let body = serde_json::json!({
        "model": id,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 12,
        "temperature": 0
    });
    let r =
        warp::test::request().method("POST").path("/v1/chat/completions").json(&body).reply(&routes).await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
    assert_eq!(r.headers()["x-modelpool-admission"], "load");
    let v: Value = serde_json::from_slice(r.body()).unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let lease = pool.acquire(id).await.unwrap();
    let msgs = vec![ChatMessage::text("user", question)];
    let (want, _, _, _, completion) =
        collect(lease.handle(), GenerateRequest::greedy(Prompt::Chat(msgs), 12)).await;
    drop(lease);
    assert_eq!(text, want, "the server answers what the backend decodes");
    assert_eq!(v["usage"]["completion_tokens"], completion);
    let pool_json: Value =
        serde_json::from_slice(warp::test::request().path("/admin/pool").reply(&routes).await.body())
            .unwrap();
    // The serving numbers are the scheduler's snapshot as of its last iteration: wait for the
    // iteration that retires the finished request.
    let mut pool_json = pool_json;
    for _ in 0..500 {
        let m = pool_json["models"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap();
        if m["serving"]["running"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        pool_json =
            serde_json::from_slice(warp::test::request().path("/admin/pool").reply(&routes).await.body())
                .unwrap();
    }
    let m = pool_json["models"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap();
    assert_eq!(m["phase"], "resident");
    assert_eq!(m["kv_bytes_per_token"], 46_080);
    assert!(m["measured"].as_u64().unwrap() > 100_000_000, "{m}");
    // The backend's scheduler (issue 9): idle, batch limit 8 (the default), nothing queued.
    let serving = &m["serving"];
    assert_eq!(
        (&serving["running"], &serving["waiting"], &serving["max_parallel"]),
        (&0.into(), &0.into(), &8.into())
    );
    let metrics = warp::test::request().path("/metrics").reply(&routes).await;
    let metrics = String::from_utf8(metrics.body().to_vec()).unwrap();
    for line in [
        format!("modelpool_backend_running{{model=\"{id}\"}} 0"),
        format!("modelpool_backend_waiting{{model=\"{id}\"}} 0"),
        format!("modelpool_backend_max_parallel{{model=\"{id}\"}} 8"),
        format!("modelpool_backend_kv_cache_bytes{{model=\"{id}\"}} 0"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let models: Value =
        serde_json::from_slice(warp::test::request().path("/v1/models").reply(&routes).await.body()).unwrap();
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == id));
}

/// Issue 17 (catalogue) and 19 (not served yet): a directory whose `config.json` has a
/// `vision_config` (a Gemma 3 multimodal config over the tiny Gemma 3 weights) is catalogued as
/// `vision`; loading it through the pool fails with an error saying the MLX backend serves no
/// vision models, and the ledger stays empty.
#[tokio::test]
async fn a_vision_directory_of_an_unserved_family_is_catalogued_as_vision_and_refused() {
    let (tmp, d) = copy_of("tiny-gemma3_text", true);
    edit_config(&d, |v| {
        v["model_type"] = "gemma3".into();
        v["vision_config"] = serde_json::json!({"model_type": "siglip_vision_model"});
    });
    let specs = scan_models_dir(tmp.path()).unwrap();
    let got: Vec<(&str, ModelType)> = specs.iter().map(|s| (&*s.id, s.model_type)).collect();
    assert_eq!(got, [("m", ModelType::Vision)]);
    let pool = lru_pool();
    pool.register(specs[0].clone());
    let err =
        pool.acquire("m").await.err().unwrap_or_else(|| panic!("a vision model was loaded")).to_string();
    assert!(err.contains("vision-language model_type 'gemma3' is not served (served: idefics3"), "{err}");
    assert_eq!(pool.status().ledger.used(), 0);
}
