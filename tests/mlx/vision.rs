//! Vision-language models (issue 19) through the backend's public handle: the tiny Idefics3
//! checkpoint of `scripts/make-vlm-fixtures.py` (tests/fixtures/vlm/idefics3) loaded as a
//! `vision` model; the stage-by-stage comparison with mlx-vlm is the library test
//! `backend::mlx::idefics3::tests::against_mlx_vlm`.

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

/// Loaded as a vision model, the checkpoint's size hint counts the vision tower (within 1% of
/// the measured arrays); the probe through the handle gives mlx-vlm's input ids and greedy ids;
/// image requests generated together with a text request (continuous batching, vision prompts
/// prefilled from their merged embeddings) give each one's solo result, and image tokens are
/// prompt tokens in the usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idefics3_checkpoint_serves_images_in_the_batch() {
    let dir = vlm_root().join("idefics3/model");
    let spec = ModelSpec::new("tiny-idefics3").with_type(ModelType::Vision).with_path(&dir);
    let model = backend().load_model(&spec).await.unwrap();
    let h: Arc<dyn ModelHandle> = model.clone();
    let hint = mlx_resident_estimate(&spec, true).unwrap();
    let measured = h.measured_bytes();
    assert!(hint.abs_diff(measured) as f64 <= 0.01 * measured as f64, "hint {hint} vs measured {measured}");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(vlm_root().join("idefics3/cases.json")).unwrap())
            .unwrap();
    let case = |n: &str| cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == n).unwrap().clone();
    let question = "What is in the picture?";
    for name in ["1000x30", "two_images"] {
        let c = case(name);
        let files: Vec<&str> = c["images"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        let probe = model.probe(ask(&files, question), 8, vec![]).await.unwrap();
        let n_img = probe
            .input_ids
            .iter()
            .filter(|&&i| u64::from(i) == cases["image_token_id"].as_u64().unwrap())
            .count();
        assert_eq!(n_img as u64, c["n_image_tokens"].as_u64().unwrap(), "{name}");
        let want: Vec<u32> =
            c["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(probe.greedy_ids, want, "{name}: greedy ids through the handle");
    }
    let prompts =
        [ask(&["1000x30.png"], question), ask(&["50x40.png", "333x77.png"], question), ask(&[], question)];
    let req = |p: &Prompt| GenerateRequest::greedy(p.clone(), 8);
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(collect(&h, req(p)).await);
    }
    assert_eq!(solo[0].3, 49, "image tokens are prompt tokens ({:?})", solo[0]);
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (h, r) = (h.clone(), req(p));
            tokio::spawn(async move { collect(&h, r).await })
        })
        .collect();
    for (t, want) in tasks.into_iter().zip(&solo) {
        let got = t.await.unwrap();
        assert_eq!((&got.0, got.2, got.3, got.4), (&want.0, want.2, want.3, want.4));
    }
    assert!(model.peak_batch() >= 2, "decoded together (peak batch {})", model.peak_batch());
    h.unload().await.unwrap();
}
