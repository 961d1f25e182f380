//! Images in chat requests: OpenAI `image_url` content parts carrying `data:` URLs, decoded
//! under the configured limits and turned into the model processor's pixel values.

use crate::api::error::ApiError;
use attune_config::ServerConfig;
use attune_models::vision::{decode_image, ImageLimits, RgbImage, Vision};
use base64::Engine as _;
use candle_core::Tensor;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The image of one `image_url` part as decoded, and ready for the vision tower:
/// (3, height, width).
pub fn load(
    part: &Value,
    field: &str,
    vision: &Vision,
    limits: &ServerConfig,
) -> Result<(Arc<RgbImage>, Tensor), ApiError> {
    let url = match part {
        Value::String(url) => url.as_str(),
        Value::Object(o) => o
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(field, "`image_url` needs a `url` string"))?,
        _ => {
            return Err(ApiError::invalid(
                field,
                "`image_url` must be an object with a `url`",
            ))
        }
    };
    let bytes = if url.starts_with("http://") || url.starts_with("https://") {
        fetch(url, limits)
    } else {
        data_url_bytes(url, limits.max_image_bytes)
    }
    .map_err(|m| ApiError::invalid(field, m))?;
    let image_limits = ImageLimits {
        max_bytes: limits.max_image_bytes,
        max_pixels: limits.max_image_pixels,
        max_side: limits.max_image_side,
    };
    let image =
        decode_image(&bytes, &image_limits).map_err(|e| ApiError::invalid(field, e.to_string()))?;
    let pixels = vision
        .encoder
        .pixel_values(&image)
        .map_err(|e| ApiError::internal(format!("image preprocessing failed: {e}")))?;
    Ok((Arc::new(image), pixels))
}

/// The bytes of a base64 `data:` URL.
fn data_url_bytes(url: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
    let rest = url
        .strip_prefix("data:")
        .ok_or("The image URL must be a `data:image/...;base64,...` URL")?;
    let (meta, payload) = rest
        .split_once(',')
        .ok_or("The data URL has no `,` before its payload")?;
    if !meta.ends_with(";base64") {
        return Err("The data URL must be base64-encoded (`;base64,`)".into());
    }
    if !meta.starts_with("image/") {
        return Err(format!(
            "The data URL's media type `{}` is not an image",
            meta.trim_end_matches(";base64")
        ));
    }
    // Base64 is 4 characters per 3 bytes: refuse before decoding what could not fit.
    if payload.len() / 4 * 3 > max_bytes + 3 {
        return Err(format!(
            "The image is larger than the {max_bytes}-byte limit"
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| format!("The image data is not valid base64: {e}"))
}

/// The bytes of a remote image whose URL starts with a configured prefix: no redirects (they
/// could leave the allowed prefixes), at most `max_image_bytes`, within the fetch timeout.
fn fetch(url: &str, limits: &ServerConfig) -> Result<Vec<u8>, String> {
    if !limits.image_url_prefixes.iter().any(|p| url.starts_with(p)) {
        return Err(if limits.image_url_prefixes.is_empty() {
            "Remote image URLs are not fetched by this server; send the image inline as a \
             `data:image/...;base64,...` URL"
                .to_string()
        } else {
            "The image URL is not under one of this server's allowed prefixes \
             (server.image_url_prefixes); send the image inline as a data: URL"
                .to_string()
        });
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(limits.image_fetch_timeout_secs)))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| format!("Fetching the image failed: {e}"))?;
    if response.status() != 200 {
        return Err(format!(
            "Fetching the image failed: HTTP {}",
            response.status()
        ));
    }
    let max = limits.max_image_bytes;
    response
        .body_mut()
        .with_config()
        .limit(max as u64)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                format!("The image is larger than the {max}-byte limit")
            }
            e => format!("Fetching the image failed: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_are_checked() {
        assert_eq!(
            data_url_bytes("data:image/png;base64,AAEC", 100).unwrap(),
            vec![0, 1, 2]
        );
        for (url, expected) in [
            ("cat.png", "must be a `data:image"),
            ("data:image/png,AAEC", "base64-encoded"),
            ("data:text/plain;base64,AAEC", "not an image"),
            ("data:image/png;base64,!!!!", "not valid base64"),
            (
                "data:image/png;base64,AAAAAAAAAAAAAAAA",
                "larger than the 4-byte limit",
            ),
        ] {
            let err = data_url_bytes(url, 4).unwrap_err();
            assert!(err.contains(expected), "{url}: {err}");
        }
    }
}
