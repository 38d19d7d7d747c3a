//! Images in chat requests: `image_url` content parts turned into decoded [`Image`]s before the
//! pool is asked for the model, so a bad image loads and evicts nothing.
//!
//! Contract, in the order the checks run (each failure a 400 `invalid_request_error` whose
//! `param` is the part's `messages[i].content[j].image_url`, or the part itself for the count):
//! 1. at most `--max-images` image parts per request (the count is checked before any image is
//!    read);
//! 2. the URL: `data:` with `;base64` always; `http(s)` only with `--remote-images` and a host
//!    in `--remote-image-hosts` (exact, case-insensitive; no redirects followed, the whole body
//!    within `--remote-image-timeout`); `file:` and every other scheme never;
//! 3. at most `--max-image-bytes` encoded bytes (for a data URL, from its base64 length before
//!    decoding; for a fetch, from `Content-Length` and again while the body is read);
//! 4. the format sniffed from the bytes (the declared media type is ignored): PNG, JPEG or WebP;
//! 5. at most `--max-image-pixels` (width x height) from the header, before any pixel is decoded;
//!    the decoder also runs under [`image::Limits`] of those dimensions, so a decompression bomb
//!    costs a header read;
//! 6. the decoded bytes the request's images need together (from their headers) at most
//!    `--max-image-memory`; if other requests hold part of that budget, this one waits for it
//!    (first come, first served) before decoding;
//! 7. the whole image decodes (a truncated or corrupt file is a 400), off the async reactor
//!    ([`tokio::task::spawn_blocking`]). Each image then holds its RGB bytes of the budget until
//!    the backend drops it (after its vision encoding).
//!
//! Pixels become 8-bit RGB as mlx-vlm 0.7.10's `load_image` makes them (the reference this
//! project's vision models are checked against): the EXIF orientation applied (Pillow's
//! `ImageOps.exif_transpose`), then Pillow's `convert("RGB")`: alpha dropped, not composited
//! over white (transformers' `convert_to_rgb` would composite, but mlx-vlm converts first);
//! grayscale replicated; palettes looked up; 16-bit samples as Pillow reduces them
//! ([`pillow_rgb`]). PNG and WebP (lossless and lossy) give Pillow's bytes exactly; JPEG is
//! decoded by zune-jpeg, not Pillow's libjpeg-turbo, within 2 levels per sample on the test
//! files (`tests/it/http/images.rs`, `decoding_matches_mlx_vlms_load_image`).
//!
//! The `detail` field of an `image_url` part is accepted and ignored.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use tokio::sync::Semaphore;

use super::error::ApiError;
use crate::backend::Image;
use crate::config::ImageConfig;

/// One image part of a request, not yet read: where it is in the request and its URL.
#[derive(Debug, Clone)]
pub(crate) struct ImageRef {
    /// `messages[i].content[j].image_url`, the `param` of every error about it.
    pub param: String,
    /// The part's `url`.
    pub url: String,
}

/// The images of one request, in order: each fetched or base64-decoded and its header checked
/// (see the module documentation for the checks and their order), then all decoded to RGB once
/// the decoded bytes they need together are free in `memory`.
///
/// `memory` counts KiB of decoded image data across every request (`--max-image-memory`). A
/// request needs its images' decoder output plus their RGB copy (from the headers), all of it
/// before any is decoded; it waits for that in arrival order (tokio's fair semaphore: the
/// request at the head gathers what is freed and no later one overtakes it), so two requests
/// cannot each hold part of what the other waits for. After decoding, each image keeps only its RGB bytes' worth, as its
/// [`Image::with_guard`] guard, returned when the backend drops the image; the rest is returned
/// at once. A request whose images need more than the whole budget is a 400 naming the flag.
pub(crate) async fn load_all(
    cfg: &ImageConfig,
    memory: &Arc<Semaphore>,
    refs: &[ImageRef],
) -> Result<Vec<Image>, ApiError> {
    let files = futures::future::try_join_all(refs.iter().map(|r| encoded_bytes(cfg, r))).await?;
    let mut probes = Vec::with_capacity(files.len());
    for (r, bytes) in refs.iter().zip(&files) {
        probes.push(probe(bytes, &r.param, cfg.max_image_pixels)?);
    }
    let need: u64 = probes.iter().map(|p| kib(p.decoded_bytes + p.rgb_bytes())).sum();
    let budget = kib(cfg.max_image_memory);
    if need > budget {
        return Err(ApiError::bad_request(
            &refs[0].param,
            format!(
                "the request's images need {} KiB decoded, more than --max-image-memory {} ({} KiB)",
                need, cfg.max_image_memory, budget
            ),
        ));
    }
    // `need` fits in u32: the budget was checked to (see `permits`).
    let mut permit = memory.clone().acquire_many_owned(permits(need)).await.map_err(|_| {
        ApiError::new(
            warp::http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "the server is shutting down",
        )
    })?;
    let params: Vec<String> = refs.iter().map(|r| r.param.clone()).collect();
    let images = tokio::task::spawn_blocking(move || {
        files
            .iter()
            .zip(&probes)
            .zip(&params)
            .map(|((b, p), param)| decode_probed(b, param, p))
            .collect::<Result<Vec<Image>, ApiError>>()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            warp::http::StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "image_decode_failed",
            format!("the image decoder stopped: {e}"),
        )
    })?;
    let images: Vec<Image> = images?;
    Ok(images
        .into_iter()
        .map(|img| {
            let keep = permits(kib(img.rgb().len() as u64));
            match permit.split(keep as usize) {
                Some(p) => img.with_guard(p),
                None => img,
            }
        })
        .collect())
}

/// `bytes` in KiB, rounded up.
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// Semaphore permits for `n` KiB: tokio counts permits in `u32` and holds at most
/// [`Semaphore::MAX_PERMITS`]; [`memory_semaphore`] caps the budget so every need that passed
/// the budget check fits.
fn permits(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The decoded-image budget of `cfg.max_image_memory`, in KiB permits (at most `u32::MAX` KiB,
/// 4 TiB, far above any machine's memory).
pub fn memory_semaphore(cfg: &ImageConfig) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(kib(cfg.max_image_memory).min(u64::from(u32::MAX)) as usize))
}

/// The bytes of the image file `r` names, at most `cfg.max_image_bytes` of them.
async fn encoded_bytes(cfg: &ImageConfig, r: &ImageRef) -> Result<Vec<u8>, ApiError> {
    let url = r.url.trim();
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("data") => data_url(cfg, &r.param, url),
        Some("http" | "https") => remote(cfg, &r.param, url).await,
        Some("file") => Err(ApiError::bad_request(
            &r.param,
            "file: URLs are never accepted: send the image inline as a data: URL (data:image/png;base64,...)",
        )),
        _ => Err(ApiError::bad_request(
            &r.param,
            "unsupported image URL: send a data: URL (data:image/png;base64,...); http(s) URLs need --remote-images",
        )),
    }
}

fn too_many_bytes(param: &str, limit: u64) -> ApiError {
    ApiError::bad_request(
        param,
        format!("the image is larger than --max-image-bytes {limit} (encoded bytes)"),
    )
}

/// Base64 as clients send it: the standard alphabet, padding optional.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The bytes of a `data:[<media type>];base64,<data>` URL. The size is checked from the base64
/// length before anything is decoded.
fn data_url(cfg: &ImageConfig, param: &str, url: &str) -> Result<Vec<u8>, ApiError> {
    let rest = &url["data:".len()..];
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::bad_request(param, "invalid data: URL: no ',' before the data"));
    };
    if !meta.split(';').any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::bad_request(
            param,
            "invalid data: URL: only base64 data is accepted (data:image/png;base64,...)",
        ));
    }
    let data = data.trim();
    let at_least = (data.len() as u64 / 4) * 3;
    if at_least > cfg.max_image_bytes {
        return Err(too_many_bytes(param, cfg.max_image_bytes));
    }
    let bytes = BASE64
        .decode(data)
        .map_err(|e| ApiError::bad_request(param, format!("invalid base64 in the data: URL: {e}")))?;
    if bytes.len() as u64 > cfg.max_image_bytes {
        return Err(too_many_bytes(param, cfg.max_image_bytes));
    }
    Ok(bytes)
}

/// The one client for remote images: no redirects followed, rustls.
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("modelpool/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The host of an `http(s)` URL if `cfg` lets it be fetched; else the 400 saying why.
pub(crate) fn check_remote(cfg: &ImageConfig, param: &str, url: &str) -> Result<reqwest::Url, ApiError> {
    if !cfg.remote_images {
        return Err(ApiError::bad_request(
            param,
            "remote image URLs are disabled; start the server with --remote-images and --remote-image-hosts HOSTS to fetch them, or send the image inline as a data: URL",
        ));
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ApiError::bad_request(param, format!("invalid image URL: {e}")))?;
    let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
    if cfg.remote_image_hosts.is_empty() {
        return Err(ApiError::bad_request(
            param,
            format!(
                "image host '{host}' is not allowed: --remote-image-hosts is empty, so every host is refused"
            ),
        ));
    }
    if !cfg.remote_image_hosts.contains(&host) {
        return Err(ApiError::bad_request(
            param,
            format!("image host '{host}' is not in --remote-image-hosts"),
        ));
    }
    Ok(parsed)
}

/// Fetch a remote image: the host allowed, no redirect, at most `max_image_bytes` (from
/// `Content-Length`, then counted while reading), the whole body within the timeout.
async fn remote(cfg: &ImageConfig, param: &str, url: &str) -> Result<Vec<u8>, ApiError> {
    let url = check_remote(cfg, param, url)?;
    let failed = |why: String| ApiError::bad_request(param, format!("cannot fetch the image: {why}"));
    let client = client().map_err(failed)?;
    let limit = cfg.max_image_bytes;
    let timeout = cfg.remote_image_timeout;
    let fetch = async {
        let mut resp = client.get(url).send().await.map_err(|e| failed(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(failed(format!("the server answered {status} (redirects are not followed)")));
        }
        if !status.is_success() {
            return Err(failed(format!("the server answered {status}")));
        }
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_many_bytes(param, limit));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| failed(e.without_url().to_string()))? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(too_many_bytes(param, limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    tokio::time::timeout(timeout, fetch).await.unwrap_or_else(|_| {
        Err(failed(format!("it did not arrive within --remote-image-timeout {}", secs(timeout))))
    })
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The formats accepted, as error messages name them.
const ACCEPTED: &str = "PNG, JPEG and WebP are accepted";

/// What an image file's header says: its format, size and the bytes its decoder will produce.
#[derive(Debug, Clone, Copy)]
struct Probe {
    format: ImageFormat,
    width: u32,
    height: u32,
    /// The decoder's output buffer (its colour type at its sample depth).
    decoded_bytes: u64,
}

impl Probe {
    fn rgb_bytes(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 3
    }
}

fn corrupt(param: &str, format: ImageFormat, e: image::ImageError) -> ApiError {
    ApiError::bad_request(param, format!("cannot decode the {format:?} image (truncated or corrupt?): {e}"))
}

/// The format sniffed from `bytes` (PNG, JPEG or WebP; the declared media type is ignored) and
/// the header read, its pixels at most `max_pixels`; nothing is decoded.
fn probe(bytes: &[u8], param: &str, max_pixels: u64) -> Result<Probe, ApiError> {
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Ok(other) => {
            return Err(ApiError::bad_request(
                param,
                format!("{} images are not accepted: {ACCEPTED}", other.extensions_str()[0].to_uppercase()),
            ));
        }
        Err(_) => {
            return Err(ApiError::bad_request(
                param,
                format!("the data is not a recognised image: {ACCEPTED}"),
            ));
        }
    };
    let decoder = ImageReader::with_format(Cursor::new(bytes), format)
        .into_decoder()
        .map_err(|e| corrupt(param, format, e))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ApiError::bad_request(
            param,
            format!(
                "the image is {width}x{height} = {pixels} pixels, more than --max-image-pixels {max_pixels}"
            ),
        ));
    }
    Ok(Probe { format, width, height, decoded_bytes: decoder.total_bytes() })
}

/// Decode a file whose header `p` passed [`probe`]: under [`image::Limits`] of its size (so a
/// file whose data disagrees with its header cannot allocate more), EXIF orientation applied,
/// converted to RGB.
fn decode_probed(bytes: &[u8], param: &str, p: &Probe) -> Result<Image, ApiError> {
    let err = |e| corrupt(param, p.format, e);
    let mut decoder = ImageReader::with_format(Cursor::new(bytes), p.format).into_decoder().map_err(err)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(p.width);
    limits.max_image_height = Some(p.height);
    // The output buffer plus as much again for a decoder's working buffers.
    limits.max_alloc = Some(p.decoded_bytes.saturating_mul(2).max(1 << 20));
    decoder.set_limits(limits).map_err(err)?;
    // Unreadable EXIF leaves the image as stored, as Pillow's exif_transpose does.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(err)?;
    img.apply_orientation(orientation);
    let (w, h) = (img.width(), img.height());
    Image::new(w, h, pillow_rgb(img)).ok_or_else(|| ApiError::bad_request(param, "the image has no pixels"))
}

/// Decode `bytes` (an image file) to RGB as mlx-vlm's `load_image` reads it, outside any memory
/// budget: [`probe`] (format and pixel limit) then the decode. For tests and tools; requests go
/// through [`load_all`].
pub fn decode(bytes: &[u8], param: &str, max_pixels: u64) -> Result<Image, ApiError> {
    decode_probed(bytes, param, &probe(bytes, param, max_pixels)?)
}

/// The RGB bytes of `img` as Pillow's `convert("RGB")` gives them for the mode Pillow opens the
/// same file in: alpha dropped, grayscale replicated; 16-bit RGB and RGBA (and 16-bit gray with
/// alpha, which Pillow opens as RGBA) keep each sample's high byte; 16-bit grayscale (Pillow's
/// `I;16`) is clamped to 255. The `image` crate's own conversions round 16-bit samples instead,
/// so those paths are spelled out.
fn pillow_rgb(img: DynamicImage) -> Vec<u8> {
    match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageLuma16(b) => {
            b.into_raw().into_iter().flat_map(|v| [v.min(255) as u8; 3]).collect()
        }
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => {
            b.pixels().flat_map(|p| [p.0[0], p.0[1], p.0[2]].map(|v| (v >> 8) as u8)).collect()
        }
        DynamicImage::ImageLumaA16(b) => b.pixels().flat_map(|p| [(p.0[0] >> 8) as u8; 3]).collect(),
        // 8-bit gray, gray + alpha, RGBA: the crate's conversion replicates gray and drops alpha.
        other => other.to_rgb8().into_raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data URL of a `w` x `h` RGB PNG (decoded: `w * h * 3` bytes, plus as much RGB).
    fn png_ref(w: u32, h: u32) -> ImageRef {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(out.get_ref());
        ImageRef { param: "p".into(), url: format!("data:image/png;base64,{b64}") }
    }

    /// Decoded images hold their RGB bytes of the budget until the last clone is dropped; a
    /// request needing more than is free waits (it is not refused) in arrival order and goes
    /// on once the holder's images are gone.
    #[tokio::test]
    async fn decoded_images_hold_their_bytes_of_the_budget_until_dropped() {
        let cfg = ImageConfig { max_image_memory: 100 * 1024, ..ImageConfig::default() };
        let memory = memory_semaphore(&cfg);
        assert_eq!(memory.available_permits(), 100);
        // 100 x 100: 30000 bytes decoded + 30000 RGB -> 59 KiB while decoding, 30 KiB after.
        let held = load_all(&cfg, &memory, &[png_ref(100, 100), png_ref(100, 100)]).await;
        assert!(held.is_err(), "two need 118 KiB, more than the budget of 100");
        let held = load_all(&cfg, &memory, &[png_ref(100, 100)]).await.unwrap();
        assert_eq!(memory.available_permits(), 70);
        let copy = held[0].clone();
        drop(held);
        assert_eq!(memory.available_permits(), 70, "a clone still holds the pixels");
        let second = load_all(&cfg, &memory, &[png_ref(100, 100)]).await.unwrap();
        assert_eq!(memory.available_permits(), 40);
        // 59 KiB needed, 40 free: the third waits at the head of the queue, gathering what is
        // freed; a smaller request behind it waits too (first come, first served).
        let refs = [png_ref(100, 100)];
        let mut third = Box::pin(load_all(&cfg, &memory, &refs));
        assert!(futures::poll!(&mut third).is_pending());
        let small = [png_ref(10, 10)];
        let mut fourth = Box::pin(load_all(&cfg, &memory, &small));
        assert!(futures::poll!(&mut fourth).is_pending(), "no overtaking the waiting request");
        drop((copy, second));
        let fourth = fourth.await.unwrap();
        drop(fourth);
        let third = third.await.unwrap();
        assert_eq!(memory.available_permits(), 70);
        assert_eq!((third[0].width(), third[0].height()), (100, 100));
        drop(third);
        assert_eq!(memory.available_permits(), 100);
    }
}
