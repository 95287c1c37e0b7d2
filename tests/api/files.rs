//! Files: `POST /api/v1/files` (raw body or multipart), download with its
//! headers, the record, delete; the owner alone sees a file; the same
//! bytes are stored once; the size cap; a 20 MB file through and back.

use std::io::Write;

use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::helpers::{Reply, TestApp, read, spawn_app, spawn_app_with};

/// A valid 1x1 PNG (one opaque red pixel), made here: signature, IHDR,
/// zlib-compressed IDAT, IEND, each chunk with its CRC.
fn tiny_png() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    // Width 1, height 1, 8-bit RGB, deflate, no filter, no interlace.
    chunk(&mut png, b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0]);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    // The scanline: filter type 0, then R, G, B.
    z.write_all(&[0, 255, 0, 0]).unwrap();
    chunk(&mut png, b"IDAT", &z.finish().unwrap());
    chunk(&mut png, b"IEND", &[]);
    png
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Blobs in the controller's file store, counted on disk.
fn blobs(app: &TestApp) -> usize {
    let Ok(dirs) = std::fs::read_dir(app.data_dir.path().join("files/blobs")) else {
        return 0;
    };
    dirs.map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum()
}

/// Uploads `bytes` as the raw body, named `name` (if any).
pub(crate) async fn upload(app: &TestApp, token: &str, bytes: Vec<u8>, name: Option<&str>) -> Reply {
    let mut url = reqwest::Url::parse(&app.url("/api/v1/files")).unwrap();
    if let Some(name) = name {
        url.query_pairs_mut().append_pair("name", name);
    }
    let r = app
        .client
        .post(url)
        .bearer_auth(token)
        .header("Content-Type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap();
    read(r).await
}

async fn upload_multipart(app: &TestApp, token: &str, bytes: Vec<u8>, file_name: &str) -> Reply {
    let form = reqwest::multipart::Form::new()
        .text("note", "a part before the file, skipped")
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(file_name.to_owned()),
        );
    let r = app
        .client
        .post(app.url("/api/v1/files"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    read(r).await
}

/// A download, read whole.
struct Download {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Download {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

async fn download(app: &TestApp, token: &str, id: &str) -> Download {
    let r = app
        .client
        .get(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    Download {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

async fn delete(app: &TestApp, token: &str, id: &str) -> Reply {
    let r = app
        .client
        .delete(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    read(r).await
}

fn time(value: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(value.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_upload_downloads_byte_identical_with_its_headers() {
    // Arrange: any valid token uploads, whatever its scopes.
    let app = spawn_app().await;
    let alice = app.token("alice", &[]);
    let bytes = b"hello, files\n".repeat(100);

    // Act
    let r = upload(&app, &alice, bytes.clone(), Some("notes \"v1\".txt")).await;

    // Assert
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["file_id"].as_str().unwrap();
    uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(r.body["name"], "notes \"v1\".txt");
    assert_eq!(r.body["size"], bytes.len());
    assert_eq!(r.body["content_type"], "text/plain; charset=utf-8");
    assert_eq!(r.body["sha256"], sha256(&bytes));
    assert_eq!(r.body["download_url"], format!("/api/v1/files/{id}"));
    assert_eq!(r.headers["location"], format!("/api/v1/files/{id}").as_str());
    assert_eq!(
        time(&r.body["expires_at"]) - time(&r.body["created_at"]),
        time::Duration::hours(24),
        "FILE_RETENTION_HOURS by default"
    );

    let d = download(&app, &alice, id).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body, bytes);
    assert_eq!(d.header("content-type"), "text/plain; charset=utf-8");
    assert_eq!(d.header("content-length"), bytes.len().to_string());
    assert_eq!(
        d.header("content-disposition"),
        "attachment; filename=\"notes _v1_.txt\"; filename*=UTF-8''notes%20%22v1%22.txt"
    );
    assert_eq!(d.header("etag"), format!("\"{}\"", sha256(&bytes)));
    assert_eq!(d.header("x-content-type-options"), "nosniff");

    let meta = app.get(Some(&alice), &format!("/api/v1/files/{id}/meta")).await;
    assert_eq!((meta.status, &meta.body), (200, &r.body));

    // Not compressed, though the client takes gzip: the bytes as stored.
    let gz = app
        .client
        .get(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&alice)
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(gz.headers().get("content-encoding").is_none());
    assert_eq!(gz.bytes().await.unwrap(), bytes);

    // The ETag again: 304, no body.
    let again = app
        .client
        .get(app.url(&format!("/api/v1/files/{id}")))
        .bearer_auth(&alice)
        .header("If-None-Match", d.header("etag"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert!(again.bytes().await.unwrap().is_empty());

    // No token: 401 in the JSON error body.
    let anonymous = app.get(None, &format!("/api/v1/files/{id}")).await;
    assert_eq!((anonymous.status, anonymous.code()), (401, "UNAUTHORIZED"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_upload_takes_the_part_file_and_content_types_are_sniffed() {
    // Arrange
    let app = spawn_app().await;
    let alice = app.token("alice", &[]);
    let png = tiny_png();

    // Act: a PNG in a multipart part `file`, named by its filename.
    let r = upload_multipart(&app, &alice, png.clone(), "dot.png").await;

    // Assert
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["name"], "dot.png");
    assert_eq!(r.body["content_type"], "image/png");
    assert_eq!(r.body["size"], png.len());
    let d = download(&app, &alice, r.body["file_id"].as_str().unwrap()).await;
    assert_eq!(d.body, png);
    assert_eq!(d.header("content-type"), "image/png");
    assert_eq!(d.header("content-disposition"), "attachment; filename=\"dot.png\"");

    // The same PNG as a raw body declared as something else: still sniffed.
    let raw = upload(&app, &alice, png.clone(), None).await;
    assert_eq!(
        (raw.body["content_type"].as_str(), raw.body["name"].as_str()),
        (Some("image/png"), Some("file"))
    );
    // JSON, text, bytes.
    for (bytes, expected) in [
        (&b" {\"width\": 640}"[..], "application/json"),
        (&b"[1, 2, 3]"[..], "application/json"),
        ("plain text, é".as_bytes(), "text/plain; charset=utf-8"),
        (&[0xff, 0xfe, 0x00, 0x9f][..], "application/octet-stream"),
    ] {
        let r = upload(&app, &alice, bytes.to_vec(), Some("x")).await;
        assert_eq!(r.body["content_type"], expected, "{bytes:?}");
    }
    // `?name=` names a multipart upload too; a path in a name is dropped.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"{}".to_vec()).file_name("../../etc/passwd"),
    );
    let r = read(
        app.client
            .post(app.url("/api/v1/files"))
            .bearer_auth(&alice)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.body["name"], "passwd");
    let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(b"{}".to_vec()));
    let r = read(
        app.client
            .post(app.url("/api/v1/files?name=params.json"))
            .bearer_auth(&alice)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.body["name"], "params.json");

    // No part `file`: 400.
    let form = reqwest::multipart::Form::new().text("other", "x");
    let r = read(
        app.client
            .post(app.url("/api/v1/files"))
            .bearer_auth(&alice)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "INVALID_REQUEST"), "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_bytes_are_two_files_over_one_blob_and_a_file_is_its_owners_alone() {
    // Arrange
    let app = spawn_app().await;
    let (alice, bob) = (app.token("alice", &[]), app.token("bob", &["execute:all"]));
    let bytes = tiny_png();

    // Act
    let first = upload(&app, &alice, bytes.clone(), Some("a.png")).await;
    let second = upload(&app, &alice, bytes.clone(), Some("b.png")).await;

    // Assert: two files, one blob.
    let (one, two) = (
        first.body["file_id"].as_str().unwrap(),
        second.body["file_id"].as_str().unwrap(),
    );
    assert_ne!(one, two);
    assert_eq!(first.body["sha256"], second.body["sha256"]);
    assert_eq!(blobs(&app), 1);

    // Another subject: 404 for everything, as for an unknown id.
    for id in [one, "no-such-file", &uuid::Uuid::new_v4().to_string()] {
        assert_eq!(download(&app, &bob, id).await.status, 404);
        let meta = app.get(Some(&bob), &format!("/api/v1/files/{id}/meta")).await;
        assert_eq!((meta.status, meta.code()), (404, "NOT_FOUND"));
        let deleted = delete(&app, &bob, id).await;
        assert_eq!((deleted.status, deleted.code()), (404, "NOT_FOUND"));
    }
    assert_eq!(
        download(&app, &alice, one).await.body,
        bytes,
        "still there for its owner"
    );
    let theirs = upload(&app, &bob, bytes.clone(), None).await;
    let theirs = theirs.body["file_id"].as_str().unwrap();
    assert_eq!(blobs(&app), 1, "bob's upload of the same bytes shares the blob");

    // Delete: 204, then 404; the blob goes with the last file naming it.
    let deleted = delete(&app, &alice, one).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    assert_eq!(download(&app, &alice, one).await.status, 404);
    assert_eq!(delete(&app, &alice, one).await.status, 404);
    assert_eq!(download(&app, &alice, two).await.body, bytes);
    assert_eq!(delete(&app, &alice, two).await.status, 204);
    assert_eq!(blobs(&app), 1);
    assert_eq!(download(&app, &bob, theirs).await.body, bytes);
    assert_eq!(delete(&app, &bob, theirs).await.status, 204);
    assert_eq!(blobs(&app), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_over_max_file_mb_is_413_and_leaves_nothing() {
    // Arrange
    let app = spawn_app_with(&["--max-file-mb", "1", "--file-retention-hours", "2"]).await;
    let alice = app.token("alice", &[]);
    let mib = 1024 * 1024;

    // Act and assert: exactly the cap fits, with the retention asked for.
    let fits = upload(&app, &alice, vec![b'a'; mib], None).await;
    assert_eq!(fits.status, 201, "{:?}", fits.body);
    assert_eq!(
        time(&fits.body["expires_at"]) - time(&fits.body["created_at"]),
        time::Duration::hours(2)
    );
    // One byte more: raw, multipart, and streamed without a length.
    let over = upload(&app, &alice, vec![b'b'; mib + 1], None).await;
    assert_eq!((over.status, over.code()), (413, "INVALID_REQUEST"), "{:?}", over.body);
    assert!(
        over.body["error"]["message"].as_str().unwrap().contains("1048576"),
        "{:?}",
        over.body
    );
    let over = upload_multipart(&app, &alice, vec![b'c'; mib + 1], "big.bin").await;
    assert_eq!((over.status, over.code()), (413, "INVALID_REQUEST"), "{:?}", over.body);
    let chunks = futures::stream::iter((0..17).map(|_| Ok::<_, std::io::Error>(vec![b'd'; 64 * 1024])));
    let r = app
        .client
        .post(app.url("/api/v1/files"))
        .bearer_auth(&alice)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let over = read(r).await;
    assert_eq!((over.status, over.code()), (413, "INVALID_REQUEST"), "{:?}", over.body);
    // Far past the route's limit: refused for its Content-Length, before it is read.
    let r = upload(&app, &alice, vec![b'e'; 3 * mib], None).await;
    assert_eq!((r.status, r.code()), (413, "INVALID_REQUEST"), "{:?}", r.body);

    assert_eq!(blobs(&app), 1, "only the file that fit");
    let staging = std::fs::read_dir(app.data_dir.path().join("files/staging")).unwrap();
    assert_eq!(staging.count(), 0, "nothing left of the refused uploads");

    // Other routes keep MAX_BODY_BYTES (1 MiB).
    let body = serde_json::json!({ "context": {}, "padding": "x".repeat(mib + 10) });
    let r = app.initialize(&app.admin(), "nodejs-calculator", body).await;
    assert_eq!(r.status, 413);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subjects_files_stay_within_its_quota() {
    // Arrange: 1 MiB a subject (any token may upload: without a quota one
    // could fill the controller's disk).
    let app = spawn_app_with(&["--files-quota-mb", "1"]).await;
    let (alice, bob) = (app.token("alice", &[]), app.token("bob", &[]));
    let kib = 1024;
    let first = upload(&app, &alice, vec![b'a'; 700 * kib], None).await;
    assert_eq!(first.status, 201, "{:?}", first.body);

    // Act: past what is left, raw and multipart.
    let over = upload(&app, &alice, vec![b'b'; 400 * kib], None).await;
    let over_multipart = upload_multipart(&app, &alice, vec![b'c'; 400 * kib], "more.bin").await;

    // Assert: refused, saying why, and nothing kept of them.
    for over in [&over, &over_multipart] {
        assert_eq!((over.status, over.code()), (413, "INVALID_REQUEST"), "{:?}", over.body);
        let message = over.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("quota of 1048576 bytes") && message.contains("716800 in use"),
            "{message}"
        );
    }
    assert_eq!(blobs(&app), 1);
    let staging = std::fs::read_dir(app.data_dir.path().join("files/staging")).unwrap();
    assert_eq!(staging.count(), 0, "nothing left of the refused uploads");
    // What fits still goes; another subject has a quota of its own.
    let fits = upload(&app, &alice, vec![b'd'; 1024 * kib - 700 * kib], None).await;
    assert_eq!(fits.status, 201, "{:?}", fits.body);
    let full = upload(&app, &alice, vec![b'e'; 1], None).await;
    assert_eq!(full.status, 413, "{:?}", full.body);
    let bobs = upload(&app, &bob, vec![b'f'; 700 * kib], None).await;
    assert_eq!(bobs.status, 201, "{:?}", bobs.body);
    // A delete makes room.
    let id = first.body["file_id"].as_str().unwrap();
    assert_eq!(delete(&app, &alice, id).await.status, 204);
    let again = upload(&app, &alice, vec![b'g'; 400 * kib], None).await;
    assert_eq!(again.status, 201, "{:?}", again.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_20_mb_file_goes_up_and_comes_back_identical() {
    // Arrange: 20 MiB that do not repeat in any short period.
    let app = spawn_app().await;
    let alice = app.token("alice", &[]);
    let mut big = Vec::with_capacity(20 * 1024 * 1024);
    let mut block = Sha256::digest(b"seed").to_vec();
    while big.len() < 20 * 1024 * 1024 {
        block = Sha256::digest(&block).to_vec();
        big.extend_from_slice(&block);
    }
    let expected = sha256(&big);

    // Act
    let r = upload(&app, &alice, big.clone(), Some("big.bin")).await;

    // Assert
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        (r.body["size"].as_u64(), r.body["sha256"].as_str()),
        (Some(big.len() as u64), Some(expected.as_str()))
    );
    let response = app
        .client
        .get(app.url(r.body["download_url"].as_str().unwrap()))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(big.len() as u64));
    let mut hasher = Sha256::new();
    let mut size = 0;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        size += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!((size, hex::encode(hasher.finalize())), (big.len(), expected.clone()));

    // As multipart too.
    let r = upload_multipart(&app, &alice, big.clone(), "big.bin").await;
    assert_eq!((r.status, r.body["sha256"].as_str()), (201, Some(expected.as_str())));
    assert_eq!(blobs(&app), 1);
}
