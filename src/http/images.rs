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
//! 6. the whole image decodes (a truncated or corrupt file is a 400), off the async reactor
//!    ([`tokio::task::spawn_blocking`]).
//!
//! Pixels become 8-bit RGB as transformers' `convert_to_rgb` does with Pillow: an RGB image is
//! kept; anything else is expanded to RGBA (grayscale replicated, palettes looked up, 16-bit
//! samples scaled to 8 bits by the `image` crate's rounding, `round(v * 255 / 65535)`) and
//! alpha-composited over opaque white with Pillow's integer arithmetic ([`over_white`]).
//!
//! The `detail` field of an `image_url` part is accepted and ignored.

use std::io::Cursor;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use image::{DynamicImage, ImageFormat, ImageReader};

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

/// The image of `r`: fetched or base64-decoded, checked against `cfg` and decoded to RGB. See
/// the module documentation for the checks and their order.
pub(crate) async fn load(cfg: &ImageConfig, r: &ImageRef) -> Result<Image, ApiError> {
    let bytes = encoded_bytes(cfg, r).await?;
    let (param, max_pixels) = (r.param.clone(), cfg.max_image_pixels);
    tokio::task::spawn_blocking(move || decode(&bytes, &param, max_pixels)).await.map_err(|e| {
        ApiError::new(
            warp::http::StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "image_decode_failed",
            format!("the image decoder stopped: {e}"),
        )
    })?
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

/// Decode `bytes` (an image file) to RGB: format sniffed, pixels checked against `max_pixels`
/// from the header first, then decoded under matching [`image::Limits`].
pub fn decode(bytes: &[u8], param: &str, max_pixels: u64) -> Result<Image, ApiError> {
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
    let corrupt = |e: image::ImageError| {
        ApiError::bad_request(
            param,
            format!("cannot decode the {format:?} image (truncated or corrupt?): {e}"),
        )
    };
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(corrupt)?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(ApiError::bad_request(
            param,
            format!("the image is {w}x{h} = {pixels} pixels, more than --max-image-pixels {max_pixels}"),
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // The output at the widest sample type a decoder of these formats produces (RGBA, 16-bit),
    // plus as much again for its working buffers.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_mul(2).max(1 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(corrupt)?;
    let (w, h) = (img.width(), img.height());
    let rgb = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        other => other.to_rgba8().pixels().flat_map(|p| over_white(p.0)).collect(),
    };
    Image::new(w, h, rgb).ok_or_else(|| ApiError::bad_request(param, "the image has no pixels"))
}

/// One RGBA pixel composited over opaque white, exactly as Pillow's
/// `Image.alpha_composite(white, image)` computes it (its integer path, 7 extra bits of
/// precision and its shift-based division by 255), which transformers' `convert_to_rgb` runs.
/// The result is `round(c * a / 255 + 255 * (255 - a) / 255)` for every channel `c` and alpha
/// `a` (checked exhaustively in the tests); alpha 255 keeps the colour, alpha 0 gives white.
pub fn over_white([r, g, b, a]: [u8; 4]) -> [u8; 3] {
    if a == 0 {
        return [255; 3];
    }
    const PRECISION_BITS: u32 = 7;
    let shift_div_255 = |v: u32| ((v >> 8) + v) >> 8;
    let a = u32::from(a);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let ch = |c: u8| {
        (shift_div_255(u32::from(c) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    };
    [ch(r), ch(g), ch(b)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_white_is_pillows_rounding() {
        for a in 0..=255u32 {
            for c in 0..=255u32 {
                let want = ((c * a) as f64 / 255.0 + (255 * (255 - a)) as f64 / 255.0).round() as u8;
                let got = over_white([c as u8, 0, 255, a as u8]);
                assert_eq!(got[0], want, "c={c} a={a}");
            }
        }
        assert_eq!(over_white([10, 20, 30, 255]), [10, 20, 30]);
        assert_eq!(over_white([10, 20, 30, 0]), [255, 255, 255]);
    }
}
