//! Files (extension): `POST /api/v1/files` uploads,
//! `GET /api/v1/files/{file_id}` downloads, `GET /api/v1/files/{file_id}/meta`
//! describes, `DELETE /api/v1/files/{file_id}` deletes ([`crate::files`]).
//!
//! Any valid token may upload (no scope is needed); a file is its
//! uploader's alone: for anyone else, as for an unknown or expired id, it
//! is 404. An upload is either the raw body (any Content-Type but
//! multipart; the name from `?name=`) or `multipart/form-data` with the
//! file in a part `file` (its filename is the name unless `?name=` is
//! given; other parts are skipped). It may be `MAX_FILE_MB` large: the
//! route has a body limit of its own above `MAX_BODY_BYTES`
//! ([`super::Envelope`]), and the file itself is counted as it streams
//! to the store.

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use super::extract::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::files::FileError;
use crate::store::StoredFile;
use fnrt_core::timefmt;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload_file))
        .routes(routes!(download_file, delete_file))
        .routes(routes!(file_meta))
}

/// An uploaded file.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct FileView {
    /// What steps and clients pass instead of the bytes.
    pub file_id: String,
    #[schema(example = "photo.jpg")]
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Sniffed from the first bytes (`image/png`, `application/json`,
    /// `text/plain; charset=utf-8`, ..., else `application/octet-stream`).
    #[schema(example = "image/jpeg")]
    pub content_type: String,
    /// Hex; also the download's `ETag`.
    pub sha256: String,
    #[schema(example = "2025-05-13T10:28:22Z")]
    pub created_at: String,
    /// `created_at` plus `FILE_RETENTION_HOURS`: the file is gone after it.
    #[schema(example = "2025-05-14T10:28:22Z")]
    pub expires_at: String,
    /// Where its owner downloads it: `/api/v1/files/{file_id}`.
    pub download_url: String,
}

impl From<StoredFile> for FileView {
    fn from(f: StoredFile) -> Self {
        FileView {
            download_url: download_url(&f.id),
            file_id: f.id,
            name: f.name,
            size: u64::try_from(f.size).unwrap_or_default(),
            content_type: f.content_type,
            sha256: f.sha256,
            created_at: at(f.created_ms),
            expires_at: at(f.expires_ms),
        }
    }
}

fn download_url(id: &str) -> String {
    format!("/api/v1/files/{id}")
}

/// A Unix-millisecond time as the contract shows times (whole seconds).
fn at(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    timefmt::format(t)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct UploadQuery {
    /// The file's name, given back in downloads' `Content-Disposition`
    /// (default: a multipart part's filename, else `file`).
    name: Option<String>,
}

/// A multipart upload as the OpenAPI document shows it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct UploadForm {
    /// The file's bytes (its filename is its name).
    #[schema(value_type = String, content_media_type = "application/octet-stream")]
    file: Vec<u8>,
}

/// Uploads a file (extension).
///
/// The body is the file (any Content-Type but multipart; name it with
/// `?name=`), or `multipart/form-data` with the file in a part `file`.
/// At most `MAX_FILE_MB` (64 MiB by default), and within the caller's
/// `FILES_QUOTA_MB` (1024 MiB by default, its files not expired yet
/// counted together). The same bytes uploaded
/// twice are two files (two ids) stored once. The file expires
/// `FILE_RETENTION_HOURS` after its upload.
#[utoipa::path(
    post,
    path = "/api/v1/files",
    tag = "files",
    params(UploadQuery),
    request_body(
        description = "The file's bytes, or `multipart/form-data` with the file in a part `file`",
        content(
            ("application/octet-stream"),
            (UploadForm = "multipart/form-data"),
        )
    ),
    responses(
        (status = 201, description = "Stored; `Location` is its download URL", body = FileView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "The file is larger than MAX_FILE_MB, or would take the caller's files past FILES_QUOTA_MB (INVALID_REQUEST)", body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn upload_file(
    State(state): State<AppState>,
    auth: Auth,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::InvalidRequest(format!("bad query: {}", e.body_text())))?;
    let owner = auth.0.sub.as_str();
    let limit = state.files.max_bytes;
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("multipart/"));
    let file = if multipart {
        let mut form = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text())))?;
        loop {
            let Some(mut part) = form.next_field().await.map_err(|e| part_error(e, limit))? else {
                return Err(ApiError::InvalidRequest(
                    "a multipart upload carries the file in a part named 'file'".into(),
                ));
            };
            if part.name() != Some("file") {
                // Read past it, keeping nothing.
                while part.chunk().await.map_err(|e| part_error(e, limit))?.is_some() {}
                continue;
            }
            let name = query
                .name
                .clone()
                .or_else(|| part.file_name().map(str::to_owned))
                .unwrap_or_default();
            let body = part.map_err(move |e| part_error(e, limit)).boxed();
            break state.files.upload(owner, &name, body).await?;
        }
    } else {
        let body = req
            .into_body()
            .into_data_stream()
            .map_err(move |e| body_error(e, limit))
            .boxed();
        state
            .files
            .upload(owner, query.name.as_deref().unwrap_or_default(), body)
            .await?
    };
    let location = HeaderValue::from_str(&download_url(&file.id)).map_err(|e| ApiError::Internal(e.into()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(FileView::from(file)),
    )
        .into_response())
}

/// A multipart body that failed while read: too large, or malformed.
fn part_error(e: axum::extract::multipart::MultipartError, limit: u64) -> FileError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        FileError::TooLarge { limit }
    } else {
        FileError::Body(e.body_text())
    }
}

/// A raw body that failed while read: past the route's body limit, or cut.
fn body_error(e: axum::Error, limit: u64) -> FileError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return FileError::TooLarge { limit };
        }
        source = s.source();
    }
    FileError::Body(e.to_string())
}

/// Downloads a file (extension): its owner only.
///
/// The bytes as uploaded, with `Content-Type` (as sniffed),
/// `Content-Length`, `Content-Disposition: attachment` (the file's name)
/// and `ETag` (its sha256); `If-None-Match` with that ETag answers 304.
#[utoipa::path(
    get,
    path = "/api/v1/files/{file_id}",
    tag = "files",
    params(("file_id" = String, Path, description = "The `file_id` the upload answered")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream",
         headers(
             ("Content-Disposition" = String, description = "`attachment; filename=\"...\"`"),
             ("ETag" = String, description = "The sha256, quoted"),
         )),
        (status = 304, description = "Unchanged: `If-None-Match` named its ETag"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn download_file(
    State(state): State<AppState>,
    auth: Auth,
    Path(file_id): Path<String>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    let (file, blob) = state.files.open(&auth.0.sub, &file_id).await?;
    let etag = format!("\"{}\"", file.sha256);
    let header = |value: &str| HeaderValue::from_str(value).map_err(|e| ApiError::Internal(e.into()));
    let unchanged = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == etag
        });
    let mut response = if unchanged {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = Response::new(Body::from_stream(blob.body));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, header(&file.content_type)?);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(blob.size));
        headers.insert(header::CONTENT_DISPOSITION, header(&content_disposition(&file.name))?);
        // Served from the API's origin: a browser must not read it as anything else.
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        response
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, header(&etag)?);
    // One subject's: no shared cache keeps it, and a browser asks again
    // (cheaply, with the ETag) since the file may be gone.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    Ok(response)
}

/// `attachment; filename="..."` with the name safely quoted: in the
/// quoted string, only printable ASCII other than `"` and `\` (anything
/// else becomes `_`), and, when that changed the name, the exact name in
/// `filename*` (RFC 6266, UTF-8 percent-encoded).
fn content_disposition(name: &str) -> String {
    let plain: String = name
        .chars()
        .map(|c| match c {
            ' ' => ' ',
            '"' | '\\' => '_',
            c if c.is_ascii_graphic() => c,
            _ => '_',
        })
        .collect();
    if plain == name {
        return format!("attachment; filename=\"{plain}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{plain}\"; filename*=UTF-8''{encoded}")
}

/// A file's record (extension): its owner only.
#[utoipa::path(
    get,
    path = "/api/v1/files/{file_id}/meta",
    tag = "files",
    params(("file_id" = String, Path, description = "The `file_id` the upload answered")),
    responses(
        (status = 200, body = FileView),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn file_meta(
    State(state): State<AppState>,
    auth: Auth,
    Path(file_id): Path<String>,
) -> Result<axum::Json<FileView>, ApiError> {
    let file = state.files.get(&auth.0.sub, &file_id).await?;
    Ok(axum::Json(FileView::from(file)))
}

/// Deletes a file (extension): its owner only. Its bytes go with the last
/// file that has them.
#[utoipa::path(
    delete,
    path = "/api/v1/files/{file_id}",
    tag = "files",
    params(("file_id" = String, Path, description = "The `file_id` the upload answered")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn delete_file(
    State(state): State<AppState>,
    auth: Auth,
    Path(file_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.files.delete(&auth.0.sub, &file_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::content_disposition;

    #[test]
    fn names_are_quoted_safely_with_the_exact_name_beside() {
        assert_eq!(
            content_disposition("photo 1.png"),
            "attachment; filename=\"photo 1.png\""
        );
        assert_eq!(
            content_disposition("a\"b\\c.txt"),
            "attachment; filename=\"a_b_c.txt\"; filename*=UTF-8''a%22b%5Cc.txt"
        );
        assert_eq!(
            content_disposition("café.jpg"),
            "attachment; filename=\"caf_.jpg\"; filename*=UTF-8''caf%C3%A9.jpg"
        );
    }
}
