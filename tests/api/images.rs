//! The shipped image functions and pipeline: resize (Pillow) -> detect
//! (OpenCV's Haar cascades) -> annotate (Pillow), files passed by
//! reference, on the bundled photo (NASA's portrait of astronaut Eileen
//! Collins, public domain, from scikit-image's sample data): one face.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::files::upload;
use crate::function_files::download;
use crate::helpers::{TestApp, repo_dir, spawn_app};

const PIPELINE: &str = "pipeline-resize-detect-annotate";

/// Initializes `language_title` once its dependencies are installed
/// (the first start on a machine downloads Pillow, OpenCV and numpy).
async fn session_when_ready(app: &TestApp, token: &str, language_title: &str) -> String {
    let started = Instant::now();
    loop {
        let r = app.initialize(token, language_title, json!({})).await;
        if r.status == 200 {
            return r.body["request_id"].as_str().unwrap().to_owned();
        }
        assert_eq!(r.status, 503, "{language_title}: {:?}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{language_title} never got ready: {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A JPEG's width and height, from its first start-of-frame segment.
fn jpeg_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..2], [0xFF, 0xD8], "not a JPEG");
    let mut i = 2;
    while i + 9 < bytes.len() {
        assert_eq!(bytes[i], 0xFF, "bad JPEG segment at {i}");
        let marker = bytes[i + 1];
        let length = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        if matches!(marker, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF) {
            let height = u16::from_be_bytes([bytes[i + 5], bytes[i + 6]]);
            let width = u16::from_be_bytes([bytes[i + 7], bytes[i + 8]]);
            return (width.into(), height.into());
        }
        i += 2 + length;
    }
    panic!("no start-of-frame segment");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_image_pipeline_finds_the_face_and_draws_it() {
    let app = spawn_app().await;
    let token = app.admin();
    let photo = std::fs::read(repo_dir().join("functions").join(PIPELINE).join("astronaut.jpg")).unwrap();
    assert_eq!(jpeg_size(&photo), (512, 512));
    let up = upload(&app, &token, photo, Some("astronaut.jpg")).await;
    assert_eq!(up.status, 201, "{:?}", up.body);
    assert_eq!(up.body["content_type"], "image/jpeg");
    let photo_id = up.body["file_id"].as_str().unwrap().to_owned();

    let id = session_when_ready(&app, &token, PIPELINE).await;
    let r = app
        .execute(&token, &id, json!({"file_id": photo_id, "width": 256}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let result = &r.body["result"];
    assert_eq!(result["count"], 1, "one face in the photo: {result}");
    let face = &result["detections"][0];
    assert_eq!(face["label"], "face");
    assert!(face["score"].as_f64().unwrap() > 0.0);
    // Where her face is: the upper middle of the photo.
    let (x, y, w, h) = (
        face["box"]["x"].as_i64().unwrap(),
        face["box"]["y"].as_i64().unwrap(),
        face["box"]["width"].as_i64().unwrap(),
        face["box"]["height"].as_i64().unwrap(),
    );
    let (cx, cy) = (x + w / 2, y + h / 2);
    assert!(
        (70..160).contains(&cx) && (25..100).contains(&cy) && (30..120).contains(&w),
        "box {x} {y} {w} {h}"
    );
    assert_eq!(
        (result["width"].as_u64(), result["height"].as_u64()),
        (Some(256), Some(256))
    );

    // The annotated image is the resized one, with the box drawn on it.
    let annotated = download(&app, &token, result["file_id"].as_str().unwrap()).await;
    assert_eq!(jpeg_size(&annotated), (256, 256));
    let steps = r.body["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["resize", "detect", "annotate"]);
    let resized = download(&app, &token, steps[0]["output"]["file_id"].as_str().unwrap()).await;
    assert_eq!(jpeg_size(&resized), (256, 256));
    assert_ne!(resized, annotated);
    // Steps passed the file by reference: detect read the resized file.
    assert_eq!(steps[1]["output"]["file_id"], steps[0]["output"]["file_id"]);
    assert_eq!(
        result["download_url"],
        format!("/api/v1/files/{}", result["file_id"].as_str().unwrap())
    );

    // An unknown model is refused before anything runs, alone and in the pipeline.
    let id = session_when_ready(&app, &token, PIPELINE).await;
    let r = app
        .execute(&token, &id, json!({"file_id": photo_id, "ai_model": "yolo-v9"}))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "INVALID_PARAMS");
    let detect = session_when_ready(&app, &token, "python-image-detect").await;
    let r = app
        .execute(&token, &detect, json!({"file_id": photo_id, "ai_model": "yolo-v9"}))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "INVALID_PARAMS");
    // Detect alone, on the original: the same single face.
    let detect = session_when_ready(&app, &token, "python-image-detect").await;
    let r = app.execute(&token, &detect, json!({"file_id": photo_id})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["count"], 1, "{:?}", r.body);
    assert_eq!(r.body["result"]["width"], 512);
}
