//! Registration archives: a `.zip` or `.tar.gz` of a function's files,
//! unpacked in memory into the files map a registration carries.
//!
//! Nothing is written to disk here: every entry is checked (its path, its
//! type, the count) before it is read, and every read stops at the bytes
//! the package may still hold, so a compression bomb costs at most the
//! limit. Entries with `..`, absolute paths, symlinks, hard links or
//! devices are refused with their name; directories are implied by paths.
//! macOS's `__MACOSX/` and `.DS_Store` entries are skipped.
//!
//! # Layout
//! - [`unpack`]: sniffs the format and unpacks.
//! - [`ArchiveError`]: a bad entry (400) or too much (413).

use std::io::{Cursor, Read};

use fnrt_core::function::package::{FileContent, PackageFiles, PackageLimits, check_path};

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not an archive, or an entry that may not be in one.
    #[error("{0}")]
    Invalid(String),
    /// More entries or bytes than a package may hold.
    #[error("{0}")]
    TooLarge(String),
}

/// Unpacks a `.zip` or a `.tar.gz` (told apart by their first bytes).
pub fn unpack(bytes: &[u8], limits: PackageLimits) -> Result<PackageFiles, ArchiveError> {
    let mut files = Files::new(limits);
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        unzip(bytes, &mut files)?;
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        untar(bytes, &mut files)?;
    } else {
        return Err(ArchiveError::Invalid(
            "'archive' must be a .zip or a .tar.gz (base64), which these bytes are not".into(),
        ));
    }
    if files.files.is_empty() {
        return Err(ArchiveError::Invalid("the archive holds no files".into()));
    }
    Ok(files.files)
}

/// The files unpacked so far, and what they may still grow to.
struct Files {
    files: PackageFiles,
    limits: PackageLimits,
    bytes: u64,
    /// Every entry seen, directories included (a bound on the work done).
    entries: usize,
}

impl Files {
    fn new(limits: PackageLimits) -> Self {
        Files {
            files: PackageFiles::new(),
            limits,
            bytes: 0,
            entries: 0,
        }
    }

    /// Counts one entry; the path it will have, or `None` to skip it.
    fn admit(&mut self, name: &str, kind: Kind) -> Result<Option<String>, ArchiveError> {
        self.entries += 1;
        // Directories may double the count of files, no more.
        if self.entries > self.limits.max_files * 2 {
            return Err(ArchiveError::TooLarge(format!(
                "the archive has more than {} entries (MAX_PACKAGE_FILES is {})",
                self.limits.max_files * 2,
                self.limits.max_files
            )));
        }
        let shown: String = name.chars().take(120).collect();
        let path = name.strip_prefix("./").unwrap_or(name).trim_end_matches('/');
        if path.is_empty() || path == "." {
            return Ok(None);
        }
        if path.split('/').next() == Some("__MACOSX") || path.rsplit('/').next() == Some(".DS_Store") {
            return Ok(None);
        }
        match kind {
            Kind::File | Kind::Dir => {}
            Kind::Refused(what) => {
                return Err(ArchiveError::Invalid(format!(
                    "archive entry {shown:?} is {what}: only regular files and directories are accepted"
                )));
            }
        }
        check_path(path).map_err(|m| ArchiveError::Invalid(format!("archive entry {m}")))?;
        if kind == Kind::Dir {
            return Ok(None);
        }
        if self.files.contains_key(path) {
            return Err(ArchiveError::Invalid(format!("archive entry {shown:?} appears twice")));
        }
        if self.files.len() >= self.limits.max_files {
            return Err(ArchiveError::TooLarge(format!(
                "the archive has more than {} files (MAX_PACKAGE_FILES)",
                self.limits.max_files
            )));
        }
        Ok(Some(path.to_owned()))
    }

    /// Reads one file's contents, never more than the package may still hold.
    fn read(&mut self, path: String, reader: impl Read) -> Result<(), ArchiveError> {
        let room = self.limits.max_bytes - self.bytes;
        let mut bytes = Vec::new();
        reader
            .take(room + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ArchiveError::Invalid(format!("archive entry {path:?} cannot be read: {e}")))?;
        if bytes.len() as u64 > room {
            return Err(ArchiveError::TooLarge(format!(
                "the archive unpacks to more than {} bytes (MAX_PACKAGE_MB), at entry {path:?}",
                self.limits.max_bytes
            )));
        }
        self.bytes += bytes.len() as u64;
        self.files.insert(path, FileContent::from_bytes(bytes));
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    /// What the entry is, in words.
    Refused(&'static str),
}

fn unzip(bytes: &[u8], files: &mut Files) -> Result<(), ArchiveError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| ArchiveError::Invalid(format!("'archive' is not a readable zip: {e}")))?;
    for i in 0..zip.len() {
        let entry = zip
            .by_index(i)
            .map_err(|e| ArchiveError::Invalid(format!("zip entry {i} cannot be read: {e}")))?;
        let name = String::from_utf8(entry.name_raw().to_vec())
            .map_err(|_| ArchiveError::Invalid(format!("zip entry {i} has a name that is not UTF-8")))?;
        let kind = match entry.unix_mode().map(|m| m & 0o170000) {
            _ if entry.is_symlink() => Kind::Refused("a symbolic link"),
            _ if entry.is_dir() => Kind::Dir,
            None | Some(0) | Some(0o100000) => Kind::File,
            Some(0o040000) => Kind::Dir,
            Some(0o020000) | Some(0o060000) => Kind::Refused("a device"),
            Some(0o010000) => Kind::Refused("a FIFO"),
            Some(_) => Kind::Refused("a special file"),
        };
        if let Some(path) = files.admit(&name, kind)? {
            files.read(path, entry)?;
        }
    }
    Ok(())
}

fn untar(bytes: &[u8], files: &mut Files) -> Result<(), ArchiveError> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(Cursor::new(bytes)));
    let broken = |e: std::io::Error| ArchiveError::Invalid(format!("'archive' is not a readable .tar.gz: {e}"));
    for entry in tar.entries().map_err(broken)? {
        let entry = entry.map_err(broken)?;
        let name = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| ArchiveError::Invalid("a tar entry has a name that is not UTF-8".into()))?;
        use tar::EntryType as T;
        let kind = match entry.header().entry_type() {
            T::Regular | T::Continuous => Kind::File,
            T::Directory => Kind::Dir,
            T::Symlink => Kind::Refused("a symbolic link"),
            T::Link => Kind::Refused("a hard link"),
            T::Char | T::Block => Kind::Refused("a device"),
            T::Fifo => Kind::Refused("a FIFO"),
            // pax global headers carry no file.
            T::XGlobalHeader => continue,
            _ => Kind::Refused("a special entry"),
        };
        if let Some(path) = files.admit(&name, kind)? {
            files.read(path, entry)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            out.start_file(*name, options).unwrap();
            out.write_all(data).unwrap();
        }
        out.finish().unwrap().into_inner()
    }

    fn tar_gz_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        let tar = builder.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    #[test]
    fn unpacks_zip_and_tar_gz() {
        let zip = zip_of(&[("app/main.py", b"x = 1"), ("app/logo.png", &[0x89, 0xff])]);
        let files = unpack(&zip, PackageLimits::default()).unwrap();
        assert_eq!(files["app/main.py"], FileContent::Text("x = 1".into()));
        assert_eq!(files["app/logo.png"].bytes().unwrap().as_ref(), &[0x89, 0xff]);

        let tgz = tar_gz_of(|b| {
            b.append_data(&mut header(tar::EntryType::Directory, 0), "./lib/", &[][..])
                .unwrap();
            b.append_data(&mut header(tar::EntryType::Regular, 2), "./lib/x.js", &b"//"[..])
                .unwrap();
        });
        let files = unpack(&tgz, PackageLimits::default()).unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["lib/x.js"]);
    }

    #[test]
    fn refuses_escapes_links_and_devices() {
        let zip = zip_of(&[("../x.py", b"")]);
        assert!(matches!(unpack(&zip, PackageLimits::default()), Err(ArchiveError::Invalid(m)) if m.contains("'..'")));
        let links = [
            (tar::EntryType::Symlink, "symbolic link"),
            (tar::EntryType::Link, "hard link"),
            (tar::EntryType::Char, "device"),
        ];
        for (kind, words) in links {
            let tgz = tar_gz_of(|b| {
                let mut h = header(kind, 0);
                h.set_link_name("/etc/passwd").unwrap();
                b.append_data(&mut h, "evil", &[][..]).unwrap();
            });
            let e = unpack(&tgz, PackageLimits::default()).unwrap_err();
            assert!(
                matches!(&e, ArchiveError::Invalid(m) if m.contains("\"evil\"") && m.contains(words)),
                "{e}"
            );
        }
        assert!(matches!(
            unpack(b"plain text", PackageLimits::default()),
            Err(ArchiveError::Invalid(_))
        ));
    }

    #[test]
    fn stops_reading_at_the_limits() {
        // 64 MiB of zeros deflates to about 64 KiB.
        let zeros = vec![0u8; 64 * 1024 * 1024];
        let bomb = zip_of(&[("a.bin", &zeros), ("b.bin", &zeros)]);
        assert!(bomb.len() < 1024 * 1024);
        let e = unpack(&bomb, PackageLimits::default()).unwrap_err();
        assert!(matches!(&e, ArchiveError::TooLarge(m) if m.contains("a.bin")), "{e}");
        let many: Vec<(String, &[u8])> = (0..300).map(|i| (format!("f{i}.js"), &b""[..])).collect();
        let many: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        assert!(matches!(
            unpack(&zip_of(&many), PackageLimits::default()),
            Err(ArchiveError::TooLarge(_))
        ));
    }
}
