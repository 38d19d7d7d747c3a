//! Images in chat requests (`image_url` parts) through the routes with the fake backend: the
//! accepted formats reach a vision model (the fake counts `FAKE_IMAGE_TOKENS` per image), and
//! every refusal is a 400 naming the part and the limit, with nothing loaded.

use std::io::Cursor;

use base64::Engine as _;
use image::{ImageFormat, Rgb, RgbImage};
use modelpool::backend::fake::FAKE_IMAGE_TOKENS;
use modelpool::config::ImageConfig;
use modelpool::{GB, Phase};
use serde_json::{Value, json};

use super::*;

/// A `w` x `h` gradient encoded as `format`.
fn encoded(format: ImageFormat, w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 11) as u8, 128]));
    let mut out = Cursor::new(Vec::new());
    match format {
        ImageFormat::WebP => image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(img).to_rgba8())
            .write_to(&mut out, format)
            .unwrap(),
        _ => img.write_to(&mut out, format).unwrap(),
    }
    out.into_inner()
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn png_url() -> String {
    data_url("image/png", &encoded(ImageFormat::Png, 12, 9))
}

/// A chat body whose one user message is "describe this" and then one image part per URL.
fn image_chat(model: &str, urls: &[String], stream: bool) -> Value {
    let mut content = vec![json!({"type": "text", "text": "describe this"})];
    for u in urls {
        content.push(json!({"type": "image_url", "image_url": {"url": u, "detail": "auto"}}));
    }
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": content}], "stream": stream});
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// Prompt tokens the fake counts for [`image_chat`] with `images` images ("user: describe this").
fn prompt_tokens(images: u32) -> u64 {
    u64::from(3 + FAKE_IMAGE_TOKENS * images)
}

/// The usage of the last chunk of an SSE body.
fn stream_usage(body: &[u8]) -> Value {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    last["usage"].clone()
}

/// `r` is a 400 naming `param` whose message contains `needle`, and nothing was loaded.
fn assert_refused(h: &Harness, r: &warp::http::Response<bytes::Bytes>, param: &str, needle: &str) {
    let e = assert_bad_request(r, param);
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(needle), "message {msg:?} does not contain {needle:?}");
    assert_eq!(h.fake.load_count(), 0, "nothing loaded for a refused image");
    assert_eq!(h.model("vis").phase, Phase::Absent);
    assert_eq!(h.model("chat-a").phase, Phase::Absent);
}

fn big_body(h: Harness) -> Harness {
    h.with_state(|s| s.with_max_body(32 << 20))
}

#[tokio::test]
async fn png_jpeg_and_webp_data_urls_reach_a_vision_model() {
    let h = big_body(Harness::new(10 * GB, 4));
    let urls = vec![
        data_url("image/png", &encoded(ImageFormat::Png, 40, 30)),
        // The declared media type is ignored: the format is sniffed from the bytes.
        data_url("image/png", &encoded(ImageFormat::Jpeg, 50, 40)),
        data_url("image/webp", &encoded(ImageFormat::WebP, 17, 23)),
    ];
    for (n, url) in urls.iter().enumerate() {
        let r = h.post("/v1/chat/completions", image_chat("vis", std::slice::from_ref(url), false)).await;
        assert_eq!(r.status(), 200, "image {n}: {}", String::from_utf8_lossy(r.body()));
        assert_eq!(json(&r)["usage"]["prompt_tokens"], prompt_tokens(1), "image {n}");
    }
    let r = h.post("/v1/chat/completions", image_chat("vis", &urls, false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(&r)["usage"]["prompt_tokens"], prompt_tokens(3));
    // Streaming: the usage chunk counts the images too.
    let r = h.post("/v1/chat/completions", image_chat("vis", &urls, true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(stream_usage(r.body())["prompt_tokens"], prompt_tokens(3));
    // A bare string image_url is accepted too.
    let mut b = image_chat("vis", &[], false);
    b["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "image_url", "image_url": urls[0]}));
    let r = h.post("/v1/chat/completions", b).await;
    assert_eq!(json(&r)["usage"]["prompt_tokens"], prompt_tokens(1));
    assert_eq!(h.fake.load_count(), 1);
}

#[tokio::test]
async fn text_only_requests_to_a_vision_model_are_unchanged() {
    let h = Harness::new(10 * GB, 4);
    let r = h.post("/v1/chat/completions", chat_body("vis", false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(&r)["usage"]["prompt_tokens"], 3, "user: hello there");
    let r = h.post("/v1/chat/completions", image_chat("vis", &[], false)).await;
    assert_eq!(json(&r)["usage"]["prompt_tokens"], prompt_tokens(0));
}

#[tokio::test]
async fn images_to_a_text_model_are_refused_before_loading() {
    let h = Harness::new(10 * GB, 4);
    let r = h.post("/v1/chat/completions", image_chat("chat-a", &[png_url()], false)).await;
    assert_refused(&h, &r, "messages[0].content[1].image_url", "not a vision model");
    let r = h.post("/v1/chat/completions", image_chat("chat-a", &[png_url()], true)).await;
    assert_refused(&h, &r, "messages[0].content[1].image_url", "not a vision model");
    // An unknown model is still a 404.
    let r = h.post("/v1/chat/completions", image_chat("nope", &[png_url()], false)).await;
    assert_error(&r, 404, "model_not_found");
}

#[tokio::test]
async fn broken_images_are_refused_naming_the_part_and_load_nothing() {
    let h = big_body(Harness::new(10 * GB, 4));
    let png = encoded(ImageFormat::Png, 64, 64);
    let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
    let bmp = b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00";
    let cases: Vec<(String, &str)> = vec![
        (data_url("image/png", &png[..png.len() / 2]), "truncated or corrupt"),
        ("data:image/png;base64,@@not base64@@".into(), "invalid base64"),
        ("data:image/png,rawbytes".into(), "only base64"),
        (data_url("image/gif", gif), "GIF images are not accepted: PNG, JPEG and WebP are accepted"),
        (data_url("image/bmp", bmp), "BMP images are not accepted"),
        (data_url("image/png", b"hello, not an image"), "not a recognised image"),
        (data_url("image/png", &huge_header_png(10_000, 10_000)), "--max-image-pixels 16777216"),
        (
            "http://example.com/cat.png".into(),
            "remote image URLs are disabled; start the server with --remote-images",
        ),
        ("https://example.com/cat.png".into(), "remote image URLs are disabled"),
        ("file:///etc/passwd".into(), "file: URLs are never accepted"),
        ("ftp://example.com/cat.png".into(), "unsupported image URL"),
        ("cat.png".into(), "unsupported image URL"),
    ];
    for (url, needle) in cases {
        for stream in [false, true] {
            let r =
                h.post("/v1/chat/completions", image_chat("vis", &[png_url(), url.clone()], stream)).await;
            assert_refused(&h, &r, "messages[0].content[2].image_url", needle);
        }
    }
    // image_url without a url.
    let mut b = image_chat("vis", &[], false);
    b["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "image_url", "image_url": {"detail": "low"}}));
    assert_refused(
        &h,
        &h.post("/v1/chat/completions", b).await,
        "messages[0].content[1].image_url",
        "string url",
    );
}

#[tokio::test]
async fn a_huge_image_is_refused_from_its_header_without_decoding() {
    // 10000 x 10000 in a file of a few dozen bytes: refused from the IHDR alone (a decode would
    // need 300 MB and fail on the missing data anyway, with another message).
    let bytes = huge_header_png(10_000, 10_000);
    assert!(bytes.len() < 64);
    let e = modelpool::http::images::decode(&bytes, "p", 16_777_216).unwrap_err();
    assert_eq!(
        e.message,
        "the image is 10000x10000 = 100000000 pixels, more than --max-image-pixels 16777216"
    );
    // Within the limit the same header is read, then the missing pixel data is the error.
    let e = modelpool::http::images::decode(&huge_header_png(100, 100), "p", 16_777_216).unwrap_err();
    assert!(e.message.contains("truncated or corrupt"), "{}", e.message);
}

#[tokio::test]
async fn image_limits_name_their_flag_and_value() {
    let h = big_body(Harness::new(10 * GB, 4));
    let nine: Vec<String> = (0..9).map(|_| png_url()).collect();
    let r = h.post("/v1/chat/completions", image_chat("vis", &nine, false)).await;
    assert_refused(&h, &r, "messages[0].content[9].image_url", "9 images, more than --max-images 8");
    let r = h.post("/v1/chat/completions", image_chat("vis", &nine[..8], false)).await;
    assert_eq!(r.status(), 200, "8 images are fine");

    let h = big_body(Harness::new(10 * GB, 4)).with_state(|s| {
        s.with_images(ImageConfig {
            max_images: 2,
            max_image_bytes: 1000,
            max_image_pixels: 400,
            ..Default::default()
        })
    });
    let big = data_url("image/png", &noisy_png(64, 64));
    let r = h.post("/v1/chat/completions", image_chat("vis", &[big], false)).await;
    assert_refused(&h, &r, "messages[0].content[1].image_url", "larger than --max-image-bytes 1000");
    let wide = data_url("image/png", &encoded(ImageFormat::Png, 21, 20));
    let r = h.post("/v1/chat/completions", image_chat("vis", &[wide], false)).await;
    assert_refused(
        &h,
        &r,
        "messages[0].content[1].image_url",
        "21x20 = 420 pixels, more than --max-image-pixels 400",
    );
    let three: Vec<String> = (0..3).map(|_| png_url()).collect();
    let r = h.post("/v1/chat/completions", image_chat("vis", &three, true)).await;
    assert_refused(&h, &r, "messages[0].content[3].image_url", "more than --max-images 2");
    let ok = data_url("image/png", &encoded(ImageFormat::Png, 20, 20));
    let r = h.post("/v1/chat/completions", image_chat("vis", &[ok.clone(), ok], false)).await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
}

#[tokio::test]
async fn remote_urls_need_the_flag_and_an_allowed_host() {
    let remote = |hosts: &[&str]| ImageConfig {
        remote_images: true,
        remote_image_hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ..Default::default()
    };
    let h = Harness::new(10 * GB, 4).with_state(|s| s.with_images(remote(&[])));
    let r = h
        .post("/v1/chat/completions", image_chat("vis", &["https://images.example.com/a.png".into()], false))
        .await;
    assert_refused(
        &h,
        &r,
        "messages[0].content[1].image_url",
        "--remote-image-hosts is empty, so every host is refused",
    );
    let h = Harness::new(10 * GB, 4).with_state(|s| s.with_images(remote(&["images.example.com"])));
    for url in [
        "https://evil.example.com/a.png",
        // The user-info trick: the host is evil.example.com.
        "https://images.example.com@evil.example.com/a.png",
        "http://images.example.com.evil.example.com/a.png",
    ] {
        let r = h.post("/v1/chat/completions", image_chat("vis", &[url.into()], false)).await;
        assert_refused(&h, &r, "messages[0].content[1].image_url", "is not in --remote-image-hosts");
    }
    let r = h.post("/v1/chat/completions", image_chat("vis", &["file:///etc/passwd".into()], false)).await;
    assert_refused(&h, &r, "messages[0].content[1].image_url", "file: URLs are never accepted");
}

/// A tiny HTTP/1.1 server on 127.0.0.1 (one request per connection) serving `/img.png` (a
/// PNG), `/big.png` (5000 bytes), `/redirect` (302 to /img.png), `/slow` (never answers) and 404
/// otherwise; its port.
async fn image_server() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let png = encoded(ImageFormat::Png, 10, 10);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let png = png.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, extra, body): (&str, String, Vec<u8>) = match path.as_str() {
                    "/img.png" => ("200 OK", "content-type: image/png\r\n".into(), png),
                    "/big.png" => ("200 OK", String::new(), vec![0u8; 5000]),
                    "/redirect" => ("302 Found", "location: /img.png\r\n".into(), Vec::new()),
                    "/slow" => {
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                        return;
                    }
                    _ => ("404 Not Found", String::new(), Vec::new()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn remote_images_are_fetched_from_allowed_hosts_without_redirects() {
    let port = image_server().await;
    let h = Harness::new(10 * GB, 4).with_state(|s| {
        s.with_images(ImageConfig {
            remote_images: true,
            remote_image_hosts: vec!["127.0.0.1".into()],
            max_image_bytes: 1000,
            remote_image_timeout: std::time::Duration::from_millis(500),
            ..Default::default()
        })
    });
    let url = |p: &str| format!("http://127.0.0.1:{port}/{p}");
    for (path, needle) in [
        ("redirect", "redirects are not followed"),
        ("missing", "404"),
        ("big.png", "larger than --max-image-bytes 1000"),
        ("slow", "did not arrive within --remote-image-timeout 500ms"),
    ] {
        let r = h.post("/v1/chat/completions", image_chat("vis", &[url(path)], false)).await;
        assert_refused(&h, &r, "messages[0].content[1].image_url", needle);
    }
    let r = h.post("/v1/chat/completions", image_chat("vis", &[url("img.png")], false)).await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
    assert_eq!(json(&r)["usage"]["prompt_tokens"], prompt_tokens(1));
}

/// Every file of tests/fixtures/images (scripts/make-image-decode-fixture.py: each PNG colour
/// type and depth, palettes with transparency, EXIF orientations 3, 6 and 8 in JPEG and PNG,
/// baseline, 4:4:4 and progressive JPEG, lossless and lossy WebP) decodes to the RGB bytes
/// mlx-vlm's `load_image` gets from Pillow 13: exactly for PNG and WebP (lossy too), within
/// `JPEG_LEVELS` per sample for JPEG (zune-jpeg against Pillow's libjpeg-turbo; measured: at
/// most 2 levels on these files).
#[test]
fn decoding_matches_mlx_vlms_load_image() {
    use modelpool::http::images::decode;
    const JPEG_LEVELS: i32 = 2;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    let mut report = Vec::new();
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let img = decode(&bytes, "p", 1 << 20).unwrap_or_else(|e| panic!("{file}: {e:?}"));
        let want: Vec<u8> = c["rgb"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
        assert_eq!(
            (u64::from(img.width()), u64::from(img.height())),
            (c["width"].as_u64().unwrap(), c["height"].as_u64().unwrap()),
            "{file}: size (EXIF orientation)"
        );
        let worst =
            img.rgb().iter().zip(&want).map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs()).max().unwrap();
        report.push(format!("{file}: max |diff| {worst}"));
        if file.ends_with(".jpg") {
            assert!(worst <= JPEG_LEVELS, "{file}: {worst} levels from Pillow's pixels");
        } else {
            assert_eq!(img.rgb(), &want[..], "{file}: Pillow's bytes");
        }
    }
    println!("{}", report.join("\n"));
}

/// A PNG of pseudo-random pixels (incompressible: about `w * h * 3` bytes).
fn noisy_png(w: u32, h: u32) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let img = RgbImage::from_fn(w, h, |_, _| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG whose IHDR claims `w` x `h` 8-bit RGB, with almost no pixel data.
fn huge_header_png(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // The start of a zlib stream as the only IDAT (a bomb's would inflate to the full size),
    // then IEND.
    for (kind, data) in [(&b"IDAT"[..], &b"\x78\x9c\x63\x60"[..]), (b"IEND", b"")] {
        let chunk = [kind, data].concat();
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A request's images count in its KV reservation before the backend sees them: each image at
/// the model's catalogued bound (`ModelSpec::image_tokens`), else `DEFAULT_IMAGE_TOKENS`.
/// With 1000 bytes of KV per token and 1 MB beside the weights, a text request fits, an image
/// bounded at 400 tokens fits, and one at 2000 tokens (2 MB of KV) is refused as never fitting.
#[tokio::test]
async fn image_tokens_count_in_the_kv_reservation() {
    use modelpool::http::DEFAULT_IMAGE_TOKENS;
    let setup = |image_tokens: Option<u32>| {
        let mut spec = modelpool::ModelSpec::new("vis").with_type(modelpool::ModelType::Vision).with_size(GB);
        spec.kv_bytes_per_token = Some(1000);
        spec.image_tokens = image_tokens;
        big_body(Harness::with_backend(
            GB + 1_000_000,
            4,
            FakeBackend::new().with_kv_per_token(1000),
            vec![spec],
        ))
    };
    let text =
        json!({"model": "vis", "max_tokens": 16, "messages": [{"role": "user", "content": "describe this"}]});
    let mut with_image = image_chat("vis", &[png_url()], false);
    with_image["max_tokens"] = json!(16);

    let h = setup(Some(400));
    let r = h.post("/v1/chat/completions", text.clone()).await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
    let r = h.post("/v1/chat/completions", with_image.clone()).await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));

    // The default bound alone needs over 1 MB here.
    const { assert!(DEFAULT_IMAGE_TOKENS >= 1000) };
    for bound in [Some(2000), None] {
        let h = setup(bound);
        let r = h.post("/v1/chat/completions", text.clone()).await;
        assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
        let r = h.post("/v1/chat/completions", with_image.clone()).await;
        assert_eq!(r.status(), 503, "{bound:?}: {}", String::from_utf8_lossy(r.body()));
        let msg = json(&r)["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("KV cache for this request's context"), "{msg}");
    }
}

/// `--max-image-memory`: a request whose images need more decoded bytes than the whole budget
/// is a 400 naming the flag, and loads nothing.
#[tokio::test]
async fn images_beyond_the_decoded_memory_budget_are_refused() {
    // 100 x 100 RGB: 30000 bytes decoded + 30000 of RGB = 59 KiB; two need 118 KiB.
    let url = data_url("image/png", &encoded(ImageFormat::Png, 100, 100));
    let h = big_body(Harness::new(10 * GB, 4)).with_state(|s| {
        s.with_images(ImageConfig { max_image_memory: 100 * 1024, ..ImageConfig::default() })
    });
    let r = h.post("/v1/chat/completions", image_chat("vis", std::slice::from_ref(&url), false)).await;
    assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
    let h = big_body(Harness::new(10 * GB, 4)).with_state(|s| {
        s.with_images(ImageConfig { max_image_memory: 100 * 1024, ..ImageConfig::default() })
    });
    let r = h.post("/v1/chat/completions", image_chat("vis", &[url.clone(), url], false)).await;
    assert_refused(&h, &r, "messages[0].content[1].image_url", "--max-image-memory 102400");
}
