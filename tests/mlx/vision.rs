//! Vision-language models (issue 19) through the backend's public handle: the tiny Idefics3,
//! Qwen2-VL and Qwen2.5-VL checkpoints of `scripts/make-vlm-fixtures.py` (tests/fixtures/vlm)
//! loaded as `vision` models; the stage-by-stage comparisons with mlx-vlm are the library tests
//! `backend::mlx::idefics3::tests::against_mlx_vlm` and
//! `backend::mlx::qwen2_vl::tests::against_mlx_vlm`.

use modelpool::backend::{ChatMessage, ContentPiece, Image};

use super::*;

fn vlm_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm")
}

fn png(name: &str) -> Image {
    let img = image::open(vlm_root().join("images").join(name)).unwrap().to_rgb8();
    Image::new(img.width(), img.height(), img.into_raw()).unwrap()
}

fn ask(images: &[&str], question: &str) -> Prompt {
    let mut pieces: Vec<ContentPiece> = images.iter().map(|f| ContentPiece::Image(png(f))).collect();
    pieces.push(ContentPiece::Text(question.into()));
    Prompt::Chat(vec![ChatMessage { pieces, ..ChatMessage::text("user", question) }])
}

/// One family's tiny checkpoint (`tests/fixtures/vlm/<family>`) loaded as a vision model: its
/// size hint counts the vision tower (within 1% of the measured arrays); the probe through the
/// handle gives mlx-vlm's image-token count and greedy ids; a generation alone gives the text of
/// mlx-vlm's greedy ids, with image tokens counted as prompt tokens; image requests generated
/// together with a text request (continuous batching, vision prompts prefilled from their
/// merged embeddings, then decoded in one batch, Qwen's at their M-RoPE-shifted positions) give
/// each one's solo result.
async fn serves_images_in_the_batch(family: &str) {
    let dir = vlm_root().join(family).join("model");
    let spec = ModelSpec::new(format!("tiny-{family}")).with_type(ModelType::Vision).with_path(&dir);
    let model = backend().load_model(&spec).await.unwrap();
    let h: Arc<dyn ModelHandle> = model.clone();
    let hint = mlx_resident_estimate(&spec, true).unwrap();
    let measured = h.measured_bytes();
    assert!(
        hint.abs_diff(measured) as f64 <= 0.01 * measured as f64,
        "{family}: hint {hint} vs measured {measured}"
    );
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(vlm_root().join(family).join("cases.json")).unwrap())
            .unwrap();
    let case = |n: &str| cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == n).unwrap().clone();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let question = "What is in the picture?";
    let names = ["1000x30", "two_images", "text_only"];
    let mut prompts = Vec::new();
    for name in names {
        let c = case(name);
        let files: Vec<&str> = c["images"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        let prompt = ask(&files, question);
        let probe = model.probe(prompt.clone(), 8, vec![]).await.unwrap();
        let n_img = probe
            .input_ids
            .iter()
            .filter(|&&i| u64::from(i) == cases["image_token_id"].as_u64().unwrap())
            .count();
        assert_eq!(n_img as u64, c["n_image_tokens"].as_u64().unwrap(), "{family} {name}");
        let want: Vec<u32> =
            c["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        if name != "text_only" {
            // (text_only's argmax is ambiguous at one step for Qwen2.5-VL: see its margins.)
            assert_eq!(probe.greedy_ids, want, "{family} {name}: greedy ids through the handle");
        }
        prompts.push((prompt, probe.input_ids.len() as u32, tokenizer.decode(&want, true).unwrap()));
    }
    let req = |p: &Prompt| GenerateRequest::greedy(p.clone(), 8);
    let mut solo = Vec::new();
    for (name, (p, prompt_tokens, text)) in names.iter().zip(&prompts) {
        let got = collect(&h, req(p)).await;
        assert_eq!(got.3, *prompt_tokens, "{family} {name}: image tokens are prompt tokens");
        if *name != "text_only" {
            // The stream withholds a trailing incomplete UTF-8 sequence, which a one-shot
            // decode writes as U+FFFD.
            let (g, w) = (got.0.trim_end_matches('\u{fffd}'), text.trim_end_matches('\u{fffd}'));
            assert_eq!(g, w, "{family} {name}: generated alone, mlx-vlm's greedy text");
        }
        solo.push(got);
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|(p, ..)| {
            let (h, r) = (h.clone(), req(p));
            tokio::spawn(async move { collect(&h, r).await })
        })
        .collect();
    for (t, want) in tasks.into_iter().zip(&solo) {
        let got = t.await.unwrap();
        assert_eq!((&got.0, got.2, got.3, got.4), (&want.0, want.2, want.3, want.4), "{family}");
    }
    assert!(model.peak_batch() >= 2, "{family}: decoded together (peak batch {})", model.peak_batch());
    h.unload().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idefics3_checkpoint_serves_images_in_the_batch() {
    serves_images_in_the_batch("idefics3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen2_vl_checkpoint_serves_images_in_the_batch() {
    serves_images_in_the_batch("qwen2_vl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen2_5_vl_checkpoint_serves_images_in_the_batch() {
    serves_images_in_the_batch("qwen2_5_vl").await;
}

/// A vision prompt longer than one 128-token prefill chunk, its images on both sides of the
/// chunk boundary: generated through the batch (chunked prefill at each chunk's slice of the
/// M-RoPE positions) it writes the text of the probe's one-pass greedy ids, for both Qwen
/// families. An image the processor refuses (aspect ratio over 200) is an invalid request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_vision_prompts_prefill_in_chunks_at_their_positions() {
    for family in ["qwen2_vl", "qwen2_5_vl"] {
        let dir = vlm_root().join(family).join("model");
        let spec = ModelSpec::new(format!("tiny-{family}")).with_type(ModelType::Vision).with_path(&dir);
        let model = backend().load_model(&spec).await.unwrap();
        let h: Arc<dyn ModelHandle> = model.clone();
        let cases: Value = serde_json::from_str(
            &std::fs::read_to_string(vlm_root().join(family).join("cases.json")).unwrap(),
        )
        .unwrap();
        let image_token = cases["image_token_id"].as_u64().unwrap() as u32;
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(5);
        let pieces = vec![
            ContentPiece::Text(text.clone()),
            ContentPiece::Image(png("1000x30.png")),
            ContentPiece::Image(png("30x1000.png")),
            ContentPiece::Text(text.clone()),
            ContentPiece::Image(png("17x301.png")),
            ContentPiece::Text("What is in the picture?".into()),
        ];
        let prompt = Prompt::Chat(vec![ChatMessage { pieces, ..ChatMessage::text("user", "") }]);
        let probe = model.probe(prompt.clone(), 8, vec![]).await.unwrap();
        let at: Vec<usize> =
            probe.input_ids.iter().enumerate().filter(|(_, i)| **i == image_token).map(|(p, _)| p).collect();
        assert_eq!(at.len(), 23 + 23 + 16, "{family}: image tokens");
        assert!(
            at[0] < 128 && *at.last().unwrap() >= 128,
            "{family}: images on both sides of the chunk ({at:?})"
        );
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let want = tokenizer.decode(&probe.greedy_ids, true).unwrap();
        let got = collect(&h, GenerateRequest::greedy(prompt, 8)).await;
        assert_eq!(got.3 as usize, probe.input_ids.len(), "{family}: prompt tokens");
        assert_eq!(
            got.0.trim_end_matches('\u{fffd}'),
            want.trim_end_matches('\u{fffd}'),
            "{family}: chunked prefill gives the one-pass greedy text"
        );
        let thin = Image::new(1, 300, vec![128; 900]).unwrap();
        let bad = Prompt::Chat(vec![ChatMessage {
            pieces: vec![ContentPiece::Image(thin), ContentPiece::Text("What is in the picture?".into())],
            ..ChatMessage::text("user", "")
        }]);
        match h.generate(GenerateRequest::greedy(bad, 4)).await {
            Err(BackendError::InvalidRequest(m)) => assert!(m.contains("aspect ratio"), "{family}: {m}"),
            Err(e) => panic!("{family}: {e}"),
            Ok(_) => panic!("{family}: an image of aspect ratio 300 was accepted"),
        }
        h.unload().await.unwrap();
    }
}
