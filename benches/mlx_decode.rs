//! MLX backend benchmark (feature `mlx`): prints markdown tables.
//!
//! `cargo bench --features mlx --bench mlx_decode` (models from `scripts/fetch-models.sh`, in
//! `$MODELPOOL_MODELS_DIR` or `<repo>/models`).
//!
//! Measures, on this machine:
//! - which BLAS MLX calls (mapped libraries, listed on Linux only, and a 1024^3 sgemm in
//!   GFLOP/s);
//! - memory read bandwidth, and from it the decode floor: weight bytes read per token / bandwidth;
//! - load time of each model, cold (file pages dropped with `posix_fadvise(DONTNEED)`, Linux
//!   only: elsewhere the cold columns print `-`) and warm;
//! - SmolLM2-135M decode and prefill tokens/s at batch 1, f32 (dequantized) and quantized
//!   weights, with the split of decode time between graph building in Rust, MLX evaluation and
//!   host-side token selection; and the same decode through the streaming `generate` API;
//! - SmolLM2-135M aggregate tokens/s of 1, 4 and 8 concurrent streams, continuous batching
//!   against one generation at a time (`max_batch: 1`) in the same run;
//! - all-MiniLM-L6-v2 sentences/s at batch 1 and 32;
//! - issue 17, "MLX-native directory": SmolLM2 from the mlx-community style 4-bit directory
//!   against the same model from the GGUF (load seconds per GB, measured bytes against the size
//!   hint, prefill and decode tok/s, f32 and kept quantized), and against mlx-lm's own
//!   `stream_generate` on the same directory (scripts/bench-mlx-lm.py in the mlx-lm venv,
//!   `$MODELPOOL_MLX_VENV` or `target/mlx-venv`). `cargo bench --features mlx --bench
//!   mlx_decode -- native` runs only this section.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use modelpool::backend::mlx::{MlxBackend, MlxModel, MlxOptions, sgemm_gflops};
use modelpool::backend::{GenerateEvent, GenerateRequest, ModelHandle, Prompt};
use modelpool::catalog::{mlx_resident_estimate, scan_models_dir};
use modelpool::estimate::weight_bytes_on_disk;
use modelpool::types::ModelSpec;

fn models_dir() -> PathBuf {
    std::env::var_os("MODELPOOL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"))
}

fn spec(id: &str) -> ModelSpec {
    let dir = models_dir();
    scan_models_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models.sh)", dir.display()))
        .into_iter()
        .find(|s| &*s.id == id)
        .unwrap_or_else(|| panic!("{id} not in {} (run scripts/fetch-models.sh)", dir.display()))
}

/// Whether [`drop_page_cache`] can make a load cold on this platform.
const COLD_LOADS: bool = cfg!(target_os = "linux");

/// Drops `path`'s pages (files under it) from the page cache, so the next read is cold.
/// Linux only (`posix_fadvise(DONTNEED)`; Apple targets have no per-file equivalent and libc
/// does not declare it there): elsewhere a no-op, and the cold columns print `-`.
fn drop_page_cache(path: &Path) {
    #[cfg(target_os = "linux")]
    {
        let files: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&f).unwrap();
            // SAFETY: a valid open descriptor; advice only affects caching.
            let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0, "posix_fadvise failed on {}", f.display());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
}

/// Best-of-5 read bandwidth over a 512 MiB buffer with `threads` threads, GB/s.
fn read_bandwidth(threads: usize) -> f64 {
    let n = 64 << 20; // u64s = 512 MiB
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(n / threads)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best / 1e9
}

/// [`blas_libraries`] off Linux: there is no `/proc/self/maps` (on macOS MLX uses Accelerate).
#[cfg(not(target_os = "linux"))]
fn blas_libraries() -> String {
    "(not listed: needs /proc/self/maps, Linux only)".to_string()
}

/// The BLAS and LAPACK libraries mapped into this process, from `/proc/self/maps` (Linux only;
/// elsewhere a note saying so: on macOS MLX uses Accelerate).
#[cfg(target_os = "linux")]
fn blas_libraries() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("blas") || p.contains("lapack"))
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .collect();
    libs.sort();
    libs.dedup();
    libs.join(", ")
}

async fn load_secs(b: &MlxBackend, spec: &ModelSpec, cold: bool) -> (f64, Arc<MlxModel>) {
    if cold {
        drop_page_cache(spec.path.as_ref().unwrap());
    }
    let t = Instant::now();
    let h = b.load_model(spec).await.unwrap();
    (t.elapsed().as_secs_f64(), h)
}

fn story_prompt(words: usize) -> String {
    let base = "The old lighthouse keeper climbed the spiral stairs every evening, counting the \
                steps and listening to the waves break against the rocks below. ";
    let mut s = String::new();
    while s.split_whitespace().count() < words {
        s.push_str(base);
    }
    s
}

struct Decode {
    prompt_tokens: usize,
    prefill_tps: f64,
    decode_tps: f64,
    graph_pct: f64,
    host_pct: f64,
}

async fn decode_probe(h: &MlxModel, words: usize, steps: usize) -> Decode {
    // One warm-up run so that allocation caches are primed.
    let _ = h.probe(Prompt::Text(story_prompt(words)), 4, vec![]).await.unwrap();
    let p = h.probe(Prompt::Text(story_prompt(words)), steps + 1, vec![]).await.unwrap();
    let t = p.timings;
    let decode = t.decode_graph + t.decode_eval + t.decode_host;
    Decode {
        prompt_tokens: p.input_ids.len(),
        prefill_tps: p.input_ids.len() as f64 / t.prefill,
        decode_tps: steps as f64 / decode,
        graph_pct: 100.0 * t.decode_graph / decode,
        host_pct: 100.0 * t.decode_host / decode,
    }
}

/// Decode through the public streaming API: (time to first piece, decode tokens/s, tokens).
async fn decode_stream(h: &Arc<dyn ModelHandle>, words: usize, max_tokens: u32) -> (f64, f64, u32) {
    let t0 = Instant::now();
    let mut s =
        h.generate(GenerateRequest::greedy(Prompt::Text(story_prompt(words)), max_tokens)).await.unwrap();
    let mut first = None;
    let mut n = 0;
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            GenerateEvent::Delta(_) => {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            }
            GenerateEvent::Done { usage, .. } => n = usage.completion_tokens,
        }
    }
    let total = t0.elapsed().as_secs_f64();
    let first = first.unwrap_or(total);
    (first, (n.saturating_sub(1)) as f64 / (total - first), n)
}

fn sentences(n: usize) -> Vec<String> {
    let subjects = ["A man", "The cat", "Our team", "A small robot", "My neighbour"];
    let verbs = ["is eating", "repairs", "paints", "is reading about", "dreams of"];
    let objects = [
        "a piece of bread.",
        "the old bicycle.",
        "a quiet harbour at dawn.",
        "quantum computers.",
        "the mountains in winter.",
    ];
    (0..n)
        .map(|i| format!("{} {} {}", subjects[i % 5], verbs[(i / 5) % 5], objects[(i / 25 + i) % 5]))
        .collect()
}

async fn run() {
    if std::env::args().any(|a| a == "native") {
        return native().await;
    }
    if std::env::args().any(|a| a == "concurrent") {
        return concurrent().await;
    }
    println!("# modelpool MLX backend benchmark\n");
    println!("host: {} cores", std::thread::available_parallelism().map_or(0, |n| n.get()));
    let gflops = sgemm_gflops(1024).unwrap();
    println!("BLAS libraries mapped: {}", blas_libraries());
    println!("MLX sgemm 1024^3: {gflops:.1} GFLOP/s (reference BLAS: ~5; OpenBLAS: >50)\n");
    let bw1 = read_bandwidth(1);
    let bw2 = read_bandwidth(2);
    println!("memory read bandwidth: {bw1:.1} GB/s (1 thread), {bw2:.1} GB/s (2 threads)\n");

    let f32b = MlxBackend::new(MlxOptions { dequantize: true, ..MlxOptions::default() });
    let qb = MlxBackend::new(MlxOptions { dequantize: false, ..MlxOptions::default() });
    let smol = spec("smollm2-135m-instruct");
    let mini = spec("all-minilm-l6-v2");

    println!("## Load time\n");
    println!("| model | weights | file MB | resident MB | cold s | cold GB/s | warm s | warm GB/s |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut handles = Vec::new();
    for (label, b, s) in
        [("f32 (dequantized)", &f32b, &smol), ("quantized", &qb, &smol), ("f32", &f32b, &mini)]
    {
        let file = weight_bytes_on_disk(s.path.as_ref().unwrap()).unwrap() as f64;
        let (cold, h) = load_secs(b, s, true).await;
        h.unload().await.unwrap();
        let (warm, h) = load_secs(b, s, false).await;
        let cold =
            if COLD_LOADS { format!("{cold:.3} | {:.2}", file / cold / 1e9) } else { "- | -".to_string() };
        println!(
            "| {} | {label} | {:.1} | {:.1} | {cold} | {warm:.3} | {:.2} |",
            s.id,
            file / 1e6,
            h.measured_bytes() as f64 / 1e6,
            file / warm / 1e9
        );
        handles.push(h);
    }
    let mini_h = handles.pop().unwrap();
    let q_h = handles.pop().unwrap();
    let f_h = handles.pop().unwrap();

    println!("\n## SmolLM2-135M-Instruct, batch 1 (greedy)\n");
    println!(
        "Decode: 128 new tokens after a ~128-token prompt. Split of decode time: graph = building the lazy graph in Rust, host = argmax over logits; the rest is MLX evaluation.\n"
    );
    println!(
        "| weights | prompt tokens | prefill tok/s | decode tok/s | graph % | host % | floor tok/s (bytes/token / 2-thread bandwidth) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, h) in [("f32", &f_h), ("quantized", &q_h)] {
        let floor = bw2 * 1e9 / h.measured_bytes() as f64;
        for words in [100, 400] {
            let d = decode_probe(h, words, 128).await;
            println!(
                "| {label} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {floor:.1} |",
                d.prompt_tokens, d.prefill_tps, d.decode_tps, d.graph_pct, d.host_pct
            );
        }
    }
    let fh: Arc<dyn ModelHandle> = f_h.clone();
    let (ttft, tps, n) = decode_stream(&fh, 100, 128).await;
    println!(
        "\nStreaming API (f32, `generate`, detokenization and channel included): first piece after {:.0} ms, decode {tps:.1} tok/s over {n} tokens",
        ttft * 1e3
    );
    f_h.unload().await.unwrap();
    q_h.unload().await.unwrap();

    concurrent().await;

    println!("\n## all-MiniLM-L6-v2 embeddings\n");
    println!("| batch | sentences | seconds | sentences/s |");
    println!("|---:|---:|---:|---:|");
    let texts = sentences(128);
    let mh: Arc<dyn ModelHandle> = mini_h.clone();
    let _ = mh.embed(texts[..8].to_vec()).await.unwrap();
    for batch in [1usize, 32] {
        let n = if batch == 1 { 64 } else { 128 };
        let t = Instant::now();
        for chunk in texts[..n].chunks(batch) {
            mh.embed(chunk.to_vec()).await.unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        println!("| {batch} | {n} | {secs:.3} | {:.1} |", n as f64 / secs);
    }
    mini_h.unload().await.unwrap();
    native().await;
}

/// SmolLM2's aggregate decode rate of N concurrent streams, batched against one at a time
/// (`cargo bench --features mlx --bench mlx_decode -- concurrent` runs only this section).
async fn concurrent() {
    const TOKENS: u32 = 128;
    println!("\n## SmolLM2-135M-Instruct, concurrent streams (continuous batching, f32)\n");
    println!(
        "N chat requests of {TOKENS} new tokens started together through `generate`; aggregate tok/s = all tokens / wall time; inter-token gaps per stream (between its text events), p50 and p99 over all streams. Anchor: one stream on the same model with `max_batch: 1` (one generation at a time, the backend before batching), measured in this run; ratio = aggregate / the anchor's.\n"
    );
    println!(
        "| concurrent | max_batch | tokens | aggregate tok/s | ratio | gap p50 ms | gap p99 ms | last s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let serial = MlxBackend::new(MlxOptions { dequantize: true, max_batch: 1, ..MlxOptions::default() });
    let batched = MlxBackend::new(MlxOptions { dequantize: true, max_batch: 16, ..MlxOptions::default() });
    let sm = spec("smollm2-135m-instruct");
    let one: Arc<dyn ModelHandle> = serial.load_model(&sm).await.unwrap();
    let many: Arc<dyn ModelHandle> = batched.load_model(&sm).await.unwrap();
    let _ = concurrent_streams(&one, 1, 8).await; // warm-up
    let _ = concurrent_streams(&many, 2, 8).await;
    let anchor = concurrent_streams(&one, 1, TOKENS).await;
    let row = |n: usize, mb: usize, r: &Streams, base: f64| {
        println!(
            "| {n} | {mb} | {} | {:.1} | {:.2}x | {:.1} | {:.1} | {:.2} |",
            r.tokens,
            r.tps(),
            r.tps() / base,
            r.gap_ms(0.5),
            r.gap_ms(0.99),
            r.secs
        )
    };
    row(1, 1, &anchor, anchor.tps());
    // `MODELPOOL_BENCH_STREAMS=8,16` measures only those counts (e.g. under a profiler).
    let counts: Vec<usize> = std::env::var("MODELPOOL_BENCH_STREAMS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16]);
    for n in counts {
        let r = concurrent_streams(&many, n, TOKENS).await;
        row(n, 16, &r, anchor.tps());
    }
    one.unload().await.unwrap();
    many.unload().await.unwrap();
}

/// Best of `runs` decode probes of `words`-word prompts, alternating over `handles` so that
/// machine load drifts over all of them alike.
async fn best_decodes(handles: &[&MlxModel], words: usize, steps: usize, runs: usize) -> Vec<Decode> {
    let mut best: Vec<Option<Decode>> = handles.iter().map(|_| None).collect();
    for _ in 0..runs {
        for (h, b) in handles.iter().zip(best.iter_mut()) {
            let d = decode_probe(h, words, steps).await;
            if b.as_ref().is_none_or(|b| d.decode_tps > b.decode_tps) {
                *b = Some(d);
            }
        }
    }
    best.into_iter().map(|b| b.expect("runs > 0")).collect()
}

/// mlx-lm's own generation on `dir` (scripts/bench-mlx-lm.py in the mlx-lm venv): its JSON
/// line, or why it did not run.
fn mlx_lm_generate(
    dir: &Path,
    prompt: &str,
    tokens: usize,
    upcast: bool,
) -> Result<serde_json::Value, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv =
        std::env::var_os("MODELPOOL_MLX_VENV").map_or_else(|| root.join("target/mlx-venv"), PathBuf::from);
    let prompt_file = std::env::temp_dir().join(format!("modelpool-bench-prompt-{}.txt", std::process::id()));
    std::fs::write(&prompt_file, prompt).map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(venv.join("bin/python"));
    // cargo puts this crate's libmlx.so (MLX 0.32.2) on the library path; the venv's mlx
    // (0.32.4) must load its own.
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd.arg(root.join("scripts/bench-mlx-lm.py")).arg(dir).arg(&prompt_file).arg(tokens.to_string());
    if upcast {
        cmd.arg("--upcast");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("{}: {e} (scripts/setup-mlx-models.sh makes it)", venv.display()))?;
    let _ = std::fs::remove_file(&prompt_file);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.lines().last().unwrap_or("")).map_err(|e| format!("{e}: {line}"))
}

/// Issue 17: SmolLM2 from the MLX 4-bit directory against the GGUF and against mlx-lm.
async fn native() {
    let gguf = spec("smollm2-135m-instruct");
    let dir = models_dir().join("mlx/SmolLM2-135M-Instruct-4bit");
    assert!(dir.join("config.json").is_file(), "{} missing: run scripts/setup-mlx-models.sh", dir.display());
    let mlx = ModelSpec::new("SmolLM2-135M-Instruct-4bit").with_path(&dir);
    println!(
        "\n## MLX-native directory (issue 17): SmolLM2-135M-Instruct, MLX 4-bit directory vs GGUF Q4_1\n"
    );
    println!(
        "Same run, same prompts, greedy. Load: s/GB = load seconds per GB of weight files (cold: pages dropped first). Hint = `mlx_resident_estimate` from the files before loading; measured = the loaded arrays. Decode: best of 3 (alternating), 128 new tokens after a 126-token prompt.\n"
    );
    println!(
        "| source | weights | file MB | hint MB | measured MB | measured / hint | cold s/GB | warm s/GB | prefill tok/s | decode tok/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for dequantize in [true, false] {
        let b = MlxBackend::new(MlxOptions { dequantize, ..MlxOptions::default() });
        let mut pair = Vec::new();
        for s in [&gguf, &mlx] {
            let file = weight_bytes_on_disk(s.path.as_ref().unwrap()).unwrap() as f64 / 1e9;
            let hint = mlx_resident_estimate(s, dequantize).unwrap() as f64;
            let (cold, h) = load_secs(&b, s, true).await;
            h.unload().await.unwrap();
            let (warm, h) = load_secs(&b, s, false).await;
            pair.push((s.id.to_string(), file, hint, cold, warm, h));
        }
        let handles: Vec<&MlxModel> = pair.iter().map(|p| &*p.5).collect();
        let decodes = best_decodes(&handles, 100, 128, 3).await;
        let weights = if dequantize { "f32 (dequantized)" } else { "quantized (packed)" };
        for ((id, file, hint, cold, warm, h), d) in pair.into_iter().zip(decodes) {
            let measured = h.measured_bytes() as f64;
            let cold = if COLD_LOADS { format!("{:.3}", cold / file) } else { "-".into() };
            println!(
                "| {id} | {weights} | {:.1} | {:.1} | {:.1} | {:.4} | {cold} | {:.3} | {:.1} | {:.1} |",
                file * 1e3,
                hint / 1e6,
                measured / 1e6,
                measured / hint,
                warm / file,
                d.prefill_tps,
                d.decode_tps
            );
            rows.push((weights, d.decode_tps));
            h.unload().await.unwrap();
        }
    }
    println!();
    for pair in rows.chunks(2) {
        println!("decode, MLX directory / GGUF, {}: {:.3}x", pair[0].0, pair[1].1 / pair[0].1);
    }

    println!("\n## The same MLX 4-bit directory: modelpool against mlx-lm 0.32.2's `stream_generate`\n");
    let (words, tokens) = (20, 32);
    println!(
        "Raw prompt of {words} words, {tokens} new tokens, greedy. modelpool: best of 3 probes. mlx-lm: one run after a warm-up, in the venv (mlx 0.32.4, mlx-cpu wheel as shipped), its own prompt_tps / generation_tps.\n"
    );
    println!("| engine | weights | prompt tokens | prefill tok/s | decode tok/s |");
    println!("|---|---|---:|---:|---:|");
    let mut ours = Vec::new();
    for (dequantize, weights) in [(true, "f32 (dequantized at load)"), (false, "packed 4-bit, f32 scales")] {
        let b = MlxBackend::new(MlxOptions { dequantize, ..MlxOptions::default() });
        let h = b.load_model(&mlx).await.unwrap();
        let d = best_decodes(&[&h], words, tokens, 3).await.remove(0);
        println!(
            "| modelpool | {weights} | {} | {:.1} | {:.2} |",
            d.prompt_tokens, d.prefill_tps, d.decode_tps
        );
        ours.push(d.decode_tps);
        h.unload().await.unwrap();
    }
    let prompt = story_prompt(words);
    let mut theirs = Vec::new();
    for (upcast, weights) in
        [(false, "packed 4-bit, bf16 scales (as loaded)"), (true, "packed 4-bit, f32 scales (upcast)")]
    {
        match mlx_lm_generate(&dir, &prompt, tokens, upcast) {
            Ok(v) => {
                let tps = v["generation_tps"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "| mlx-lm | {weights} | {} | {:.1} | {tps:.2} |",
                    v["prompt_tokens"],
                    v["prompt_tps"].as_f64().unwrap_or(f64::NAN)
                );
                theirs.push(tps);
            }
            Err(e) => {
                println!("| mlx-lm | {weights} | did not run: {} | | |", e.lines().last().unwrap_or(""))
            }
        }
    }
    if let [bf16, f32s] = theirs[..] {
        println!("\ndecode, modelpool f32 (the CPU default) / mlx-lm as loaded: {:.1}x", ours[0] / bf16);
        println!(
            "decode, modelpool packed / mlx-lm upcast (the same quantized kernel and scales): {:.2}x",
            ours[1] / f32s
        );
    }
}

/// `n` greedy chat generations of `tokens` new tokens each, started together: aggregate
/// tokens per second and seconds until the last one ended.
/// What [`concurrent_streams`] measured.
struct Streams {
    tokens: u64,
    secs: f64,
    /// Seconds between consecutive text events of one stream, over all streams.
    gaps: Vec<f64>,
}

impl Streams {
    fn tps(&self) -> f64 {
        self.tokens as f64 / self.secs
    }

    /// The `q` quantile of the inter-token gaps, in milliseconds (nearest rank).
    fn gap_ms(&self, q: f64) -> f64 {
        let mut g = self.gaps.clone();
        g.sort_by(f64::total_cmp);
        if g.is_empty() {
            return f64::NAN;
        }
        let i = ((q * g.len() as f64).ceil() as usize).clamp(1, g.len()) - 1;
        g[i] * 1e3
    }
}

/// `n` chat generations of up to `tokens` tokens started together on `h`.
async fn concurrent_streams(h: &Arc<dyn ModelHandle>, n: usize, tokens: u32) -> Streams {
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                let msgs = vec![modelpool::backend::ChatMessage::text(
                    "user",
                    format!("Tell me a long story about the number {i}."),
                )];
                let mut req = GenerateRequest::greedy(Prompt::Chat(msgs), tokens);
                req.stop = Vec::new();
                let mut s = h.generate(req).await.unwrap();
                let (mut n, mut gaps, mut last) = (0u64, Vec::new(), None::<Instant>);
                while let Some(ev) = s.next().await {
                    match ev.unwrap() {
                        GenerateEvent::Delta(_) => {
                            let now = Instant::now();
                            if let Some(l) = last {
                                gaps.push((now - l).as_secs_f64());
                            }
                            last = Some(now);
                        }
                        GenerateEvent::Done { usage, .. } => n = u64::from(usage.completion_tokens),
                    }
                }
                (n, gaps)
            })
        })
        .collect();
    let (mut tokens, mut gaps) = (0, Vec::new());
    for task in tasks {
        let (n, g) = task.await.unwrap();
        tokens += n;
        gaps.extend(g);
    }
    Streams { tokens, secs: t.elapsed().as_secs_f64(), gaps }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
