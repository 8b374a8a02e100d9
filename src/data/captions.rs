//! Captioned images for `kdmcse precompute`: a COCO captions JSON or `IMAGE_FILE<TAB>CAPTION`
//! lines, grouped by image, checked against the image folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Captions grouped by image: (image name, image file, captions).
pub type CaptionedImages = Vec<(String, PathBuf, Vec<String>)>;

/// Reads a COCO captions JSON (images in id order, captions in annotation order) keeping the
/// images present in `images`, or `FILE<TAB>CAPTION` lines (every image must exist).
pub fn read_captions(path: &Path, images: &Path) -> Result<CaptionedImages> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        #[derive(serde::Deserialize)]
        struct Image {
            id: u64,
            file_name: String,
        }
        #[derive(serde::Deserialize)]
        struct Annotation {
            id: u64,
            image_id: u64,
            caption: String,
        }
        #[derive(serde::Deserialize)]
        struct Coco {
            images: Vec<Image>,
            annotations: Vec<Annotation>,
        }
        let mut coco: Coco = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a COCO captions file", path.display()))?;
        coco.images.sort_by_key(|i| i.id);
        coco.annotations.sort_by_key(|a| a.id);
        let mut out: CaptionedImages = Vec::new();
        let mut index = std::collections::HashMap::new();
        let mut absent = 0;
        for image in &coco.images {
            let file = images.join(&image.file_name);
            if file.is_file() {
                index.insert(image.id, out.len());
                out.push((image.id.to_string(), file, Vec::new()));
            } else {
                absent += 1;
            }
        }
        for a in coco.annotations {
            if let Some(&i) = index.get(&a.image_id) {
                out[i].2.push(a.caption);
            }
        }
        if absent > 0 {
            tracing::warn!(absent, present = out.len(), folder = %images.display(), "images of the captions file not in the folder are left out");
        }
        out.retain(|(_, _, captions)| !captions.is_empty());
        Ok(out)
    } else {
        let mut out: CaptionedImages = Vec::new();
        let mut index = std::collections::HashMap::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let (file, caption) = line
                .split_once('\t')
                .with_context(|| format!("{}:{}: expected IMAGE_FILE<TAB>CAPTION", path.display(), n + 1))?;
            let i = *index.entry(file.to_owned()).or_insert_with(|| {
                out.push((file.to_owned(), images.join(file), Vec::new()));
                out.len() - 1
            });
            if !out[i].1.is_file() {
                bail!("{}:{}: image {} not found", path.display(), n + 1, out[i].1.display());
            }
            out[i].2.push(caption.to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_with_images(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            std::fs::write(dir.path().join(name), b"not read here").unwrap();
        }
        dir
    }

    #[test]
    fn coco_json_keeps_id_order_and_the_images_present() {
        let images = folder_with_images(&["a.jpg", "c.jpg"]);
        let json = images.path().join("captions.json");
        std::fs::write(
            &json,
            r#"{"images": [{"id": 3, "file_name": "c.jpg"}, {"id": 1, "file_name": "a.jpg"},
                          {"id": 2, "file_name": "b.jpg"}],
                "annotations": [{"id": 11, "image_id": 3, "caption": "a cat"},
                                {"id": 10, "image_id": 1, "caption": "a dog"},
                                {"id": 12, "image_id": 1, "caption": "a dog again"},
                                {"id": 13, "image_id": 2, "caption": "absent"}]}"#,
        )
        .unwrap();
        let grouped = read_captions(&json, images.path()).unwrap();
        let summary: Vec<(&str, Vec<&str>)> =
            grouped.iter().map(|(n, _, c)| (n.as_str(), c.iter().map(String::as_str).collect())).collect();
        assert_eq!(summary, [("1", vec!["a dog", "a dog again"]), ("3", vec!["a cat"])]);
        assert_eq!(grouped[0].1, images.path().join("a.jpg"));
    }

    #[test]
    fn tab_separated_lines_group_by_image_and_name_bad_lines() {
        let images = folder_with_images(&["x.png", "y.png"]);
        let tsv = images.path().join("captions.tsv");
        std::fs::write(&tsv, "x.png\tone\ny.png\ttwo\n\nx.png\tthree\n").unwrap();
        let grouped = read_captions(&tsv, images.path()).unwrap();
        let captions: Vec<usize> = grouped.iter().map(|(_, _, c)| c.len()).collect();
        assert_eq!((grouped[0].0.as_str(), captions), ("x.png", vec![2, 1]));

        std::fs::write(&tsv, "x.png\tfine\nno tab here\n").unwrap();
        let err = read_captions(&tsv, images.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{}:2", tsv.display())) && err.contains("IMAGE_FILE<TAB>CAPTION"),
            "{err}"
        );
        std::fs::write(&tsv, "x.png\tfine\nz.png\tmissing image\n").unwrap();
        let err = read_captions(&tsv, images.path()).unwrap_err().to_string();
        assert!(err.contains(":2") && err.contains("z.png") && err.contains("not found"), "{err}");
    }
}
