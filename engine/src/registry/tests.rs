//! Registry behaviour on real files in a temp data directory.

use super::*;
use crate::testing::GgufBuilder;

struct Fixture {
    dir: tempfile::TempDir,
    reg: Registry,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        Self { dir, reg }
    }

    /// Writes a model file built from `b` and returns its path.
    fn file(&self, file: &str, b: &GgufBuilder) -> PathBuf {
        let p = self.dir.path().join(file);
        std::fs::write(&p, b.build()).unwrap();
        p
    }

    fn import(
        &mut self,
        b: &GgufBuilder,
        name: &str,
        version: Option<&str>,
    ) -> Result<ImportOutcome> {
        let p = self.file("in.gguf", b);
        self.reg.import(&p, name, version, &mut |_| {})
    }

    fn salted(salt: u8) -> GgufBuilder {
        let mut b = GgufBuilder::llama_like();
        b.salt = salt;
        b
    }

    /// Files in the blob folder, temp files included.
    fn blob_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The one helper: `name:version[aliases]` of every model, in list order.
    fn check(&self, expect: &str) {
        let got: Vec<String> = self
            .reg
            .list()
            .unwrap()
            .iter()
            .map(|m| format!("{}[{}]", m.label(), m.aliases.join(",")))
            .collect();
        assert_eq!(got.join(" "), expect);
    }
}

fn r(s: &str) -> ModelRef {
    s.parse().unwrap()
}

#[test]
fn import_records_what_the_file_declares() {
    let mut f = Fixture::new();
    let bytes = GgufBuilder::llama_like().build();
    let m = f.import(&GgufBuilder::llama_like(), "tiny", None).unwrap();
    let m = m.record();
    assert_eq!(m.label(), "tiny:1");
    assert_eq!(m.architecture, "llama");
    assert_eq!(m.quantization, "q4_1");
    assert_eq!(m.parameters, 64 * 16 + 64 * 64 + 64 * 128 + 64);
    assert_eq!(m.class, SizeClass::Micro);
    assert_eq!(m.context_length, Some(2048));
    assert_eq!(m.size_bytes, bytes.len() as u64);
    assert_eq!(
        m.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
    );
    assert_eq!(std::fs::read(f.reg.model_path(m)).unwrap(), bytes);
    assert!(
        m.imported_at.ends_with('Z') && m.imported_at.len() == 24,
        "{}",
        m.imported_at
    );
    f.check("tiny:1[]");
}

#[test]
fn each_model_says_where_it_came_from_and_old_registries_read_as_imported() {
    let dir = tempfile::tempdir().unwrap();
    // A registry written before the column existed (schema 1), with one model.
    {
        let conn = Connection::open(dir.path().join("registry.db")).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute(
            "INSERT INTO models (name, version, sha256, size_bytes, architecture, quantization,
                                 parameters, context_length, imported_at)
             VALUES ('old', '1', ?1, 1, 'llama', 'q4_1', 1, NULL, '2026-01-01T00:00:00.000Z')",
            ["ab".repeat(32)],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
    }
    let mut reg = Registry::open(dir.path()).unwrap();
    let file = dir.path().join("in.gguf");
    std::fs::write(&file, Fixture::salted(1).build()).unwrap();
    reg.import_from(&file, "pushed", None, ModelSource::Rollout(7), &mut |_| {})
        .unwrap();
    std::fs::write(&file, Fixture::salted(2).build()).unwrap();
    reg.import(&file, "mine", None, &mut |_| {}).unwrap();
    let got: Vec<String> = Registry::open_read_only(dir.path())
        .unwrap()
        .list()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m.label(), m.source))
        .collect();
    assert_eq!(got, ["mine:1 import", "old:1 import", "pushed:1 rollout:7"]);
}

#[test]
fn same_bytes_are_stored_once() {
    let mut f = Fixture::new();
    let first = f.import(&Fixture::salted(0), "a", None).unwrap();
    let again = f.import(&Fixture::salted(0), "a", None).unwrap();
    assert!(matches!(again, ImportOutcome::AlreadyPresent(_)));
    f.import(&Fixture::salted(0), "b", None).unwrap();
    f.check("a:1[] b:1[]");
    assert_eq!(f.blob_files(), vec![first.record().sha256.clone()]);
}

#[test]
fn versions_count_up_per_name_and_explicit_ones_are_unique() {
    let mut f = Fixture::new();
    for salt in 0..3 {
        f.import(&Fixture::salted(salt), "m", None).unwrap();
    }
    f.import(&Fixture::salted(3), "m", Some("2025.1-rc"))
        .unwrap();
    f.import(&Fixture::salted(4), "m", None).unwrap();
    f.check("m:1[] m:2[] m:3[] m:2025.1-rc[] m:4[]");
    let err = f.import(&Fixture::salted(5), "m", Some("3")).unwrap_err();
    assert_eq!(err.to_string(), "model m:3 already exists");
    assert_eq!(f.reg.resolve(&r("m")).unwrap().version, "4");
}

#[test]
fn references_resolve_by_name_version_and_digest() {
    let mut f = Fixture::new();
    let one = f
        .import(&Fixture::salted(0), "m", None)
        .unwrap()
        .record()
        .clone();
    f.import(&Fixture::salted(1), "m", None).unwrap();
    assert_eq!(f.reg.resolve(&r("m:1")).unwrap(), one);
    let digest = format!("sha256:{}", &one.sha256[..12]);
    assert_eq!(f.reg.resolve(&r(&digest)).unwrap(), one);
    assert_eq!(f.reg.resolve(&r("m")).unwrap().version, "2");
    assert_eq!(
        f.reg.resolve(&r("other")).unwrap_err().to_string(),
        "no model matches 'other'"
    );
    assert!(f.reg.resolve(&r("sha256:000000000000")).is_err());
    for bad in [
        "",
        "sha256:abc",
        "sha256:zzzzzzzzzzzzzz",
        "a:b:c",
        "../x",
        "-x",
        "a b",
    ] {
        assert!(
            bad.parse::<ModelRef>().is_err(),
            "{bad:?} should be refused"
        );
    }
}

#[test]
fn a_name_resolves_as_an_alias_first_then_as_a_reference() {
    let mut f = Fixture::new();
    for salt in 0..2 {
        f.import(&Fixture::salted(salt), "m", None).unwrap();
    }
    f.reg.activate(&r("m:1"), "default").unwrap();
    let by = |reg: &Registry, name: &str| reg.resolve_ref_or_alias(name).map(|m| m.label());
    assert_eq!(by(&f.reg, "default").unwrap(), "m:1", "the alias");
    assert_eq!(by(&f.reg, "m").unwrap(), "m:2", "the latest version");
    assert_eq!(by(&f.reg, "m:1").unwrap(), "m:1");
    // An alias named like a model wins: it is what an operator activated.
    f.reg.activate(&r("m:1"), "m").unwrap();
    assert_eq!(by(&f.reg, "m").unwrap(), "m:1");
    for missing in ["chat", "sha256:zz", "nope:3", "a b"] {
        match f.reg.resolve_ref_or_alias(missing) {
            Err(RegistryError::NotFound(n)) => assert_eq!(n, missing),
            other => panic!("{missing}: {other:?}"),
        }
    }
}

#[test]
fn activate_and_rollback_walk_back_through_history() {
    let mut f = Fixture::new();
    for salt in 0..3 {
        f.import(&Fixture::salted(salt), "m", None).unwrap();
    }
    assert!(matches!(
        f.reg.rollback("default"),
        Err(RegistryError::NothingToRollback(_))
    ));
    f.reg.activate(&r("m:1"), "default").unwrap();
    f.reg.activate(&r("m:2"), "default").unwrap();
    f.reg.activate(&r("m:2"), "default").unwrap(); // no-op, not a history entry
    let a = f.reg.activate(&r("m:3"), "default").unwrap();
    assert_eq!(a.previous.unwrap().label(), "m:2");
    f.reg.activate(&r("m:1"), "chat").unwrap();
    f.check("m:1[chat] m:2[] m:3[default]");
    let preview = f.reg.rollback_target("default").unwrap();
    f.check("m:1[chat] m:2[] m:3[default]");
    let back = f.reg.rollback("default").unwrap();
    assert_eq!(
        preview.label(),
        back.model.label(),
        "the preview names the target"
    );
    assert_eq!(
        (back.previous.unwrap().label(), back.model.label()),
        ("m:3".into(), "m:2".into())
    );
    f.reg.rollback("default").unwrap();
    f.check("m:1[chat,default] m:2[] m:3[]");
    assert!(f.reg.rollback("default").is_err());
}

#[test]
fn remove_refuses_an_active_model_unless_forced() {
    let mut f = Fixture::new();
    let one = f
        .import(&Fixture::salted(0), "m", None)
        .unwrap()
        .record()
        .clone();
    f.import(&Fixture::salted(1), "m", None).unwrap();
    f.reg.activate(&r("m:1"), "default").unwrap();
    f.reg.activate(&r("m:2"), "default").unwrap();
    let err = f.reg.remove(&r("m:2"), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "model m:2 is active as default; activate another model first or pass --force"
    );
    f.check("m:1[] m:2[default]");
    let removed = f.reg.remove(&r("m:2"), true).unwrap();
    assert!(removed.blob_deleted);
    f.check("m:1[]");
    assert_eq!(f.blob_files(), vec![one.sha256.clone()]);
    // The history survives the forced removal: rollback finds m:1.
    assert_eq!(f.reg.rollback("default").unwrap().model.label(), "m:1");
}

#[test]
fn a_shared_blob_stays_until_its_last_entry_goes() {
    let mut f = Fixture::new();
    let a = f
        .import(&Fixture::salted(0), "a", None)
        .unwrap()
        .record()
        .clone();
    f.import(&Fixture::salted(0), "b", None).unwrap();
    assert!(f.reg.remove(&r("a"), false).unwrap().blob_kept);
    assert_eq!(f.blob_files(), vec![a.sha256.clone()]);
    assert!(f.reg.remove(&r("b"), false).unwrap().blob_deleted);
    assert!(f.blob_files().is_empty());
}

#[test]
fn a_blob_held_open_by_an_engine_is_never_deleted() {
    let mut f = Fixture::new();
    let m = f
        .import(&Fixture::salted(0), "a", None)
        .unwrap()
        .record()
        .clone();
    let held = f.reg.blobs().open_shared(&m.sha256).unwrap();
    let removed = f.reg.remove(&r("a"), false).unwrap();
    assert!(removed.blob_kept && !removed.blob_deleted);
    let gc = f.reg.gc().unwrap();
    assert_eq!(gc.blobs_in_use, vec![m.sha256.clone()]);
    assert_eq!(f.blob_files(), vec![m.sha256.clone()]);
    drop(held);
    let gc = f.reg.gc().unwrap();
    assert_eq!(gc.blobs_removed, vec![m.sha256.clone()]);
    assert!(f.blob_files().is_empty());
}

#[test]
fn gc_removes_orphans_and_dead_temp_files_only() {
    let mut f = Fixture::new();
    let keep = f
        .import(&Fixture::salted(0), "a", None)
        .unwrap()
        .record()
        .clone();
    let store = f.dir.path().join("blobs/sha256");
    let orphan = "ab".repeat(32);
    std::fs::write(store.join(&orphan), b"left by a crash").unwrap();
    std::fs::write(store.join(".import-dead"), b"partial").unwrap();
    let live = std::fs::File::create(store.join(".import-live")).unwrap();
    live.lock().unwrap();
    std::fs::write(store.join("README"), b"not ours").unwrap();
    let report = f.reg.gc().unwrap();
    assert_eq!(report.blobs_removed, vec![orphan]);
    assert_eq!(report.temp_files_removed, 1);
    let mut expect = vec![".import-live".to_string(), "README".into(), keep.sha256];
    expect.sort();
    assert_eq!(f.blob_files(), expect);
}

#[test]
fn bad_files_leave_the_registry_and_the_store_unchanged() {
    let mut f = Fixture::new();
    f.import(&Fixture::salted(0), "good", None).unwrap();
    let before = f.blob_files();
    let mut truncated = GgufBuilder::llama_like();
    truncated.truncate_data_by = 10;
    let not_gguf = f.file("notes.txt", &GgufBuilder::new("x"));
    std::fs::write(&not_gguf, "just some text").unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (not_gguf, "is not a valid GGUF model: not a GGUF file"),
        (f.file("t.gguf", &truncated), "lies outside the file"),
        (f.dir.path().join("missing.gguf"), "opening"),
        (f.dir.path().to_path_buf(), "is a directory"),
    ];
    for (path, expect) in cases {
        let err = f
            .reg
            .import(&path, "bad", None, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{}: {err}", path.display());
        f.check("good:1[]");
        assert_eq!(f.blob_files(), before);
    }
    let err = f
        .import(&GgufBuilder::llama_like(), "no/slash", None)
        .unwrap_err();
    assert!(err.to_string().starts_with("invalid model name 'no/slash'"));
}

#[test]
fn a_file_without_architecture_is_not_a_model() {
    let mut f = Fixture::new();
    let mut b = GgufBuilder::llama_like();
    b.kv_u32("general.architecture", 7);
    let err = f.import(&b, "x", None).unwrap_err();
    assert!(
        err.to_string().contains("has no general.architecture"),
        "{err}"
    );
    assert!(f.blob_files().is_empty());
}

#[test]
fn a_newer_schema_is_refused_not_downgraded() {
    let f = Fixture::new();
    drop(f.reg);
    let conn = Connection::open(f.dir.path().join("registry.db")).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Registry::open(f.dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("schema version 99, but this outpost understands 2"),
        "{err}"
    );
    assert!(Registry::open_read_only(f.dir.path()).is_err());
}

#[test]
fn reading_creates_nothing_and_sees_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("never-written");
    assert!(
        Registry::open_read_only(&absent)
            .unwrap()
            .list()
            .unwrap()
            .is_empty()
    );
    assert!(
        !absent.exists(),
        "a read must not create the data directory"
    );
    let mut f = Fixture::new();
    f.import(&Fixture::salted(0), "m", None).unwrap();
    f.reg.activate(&r("m"), "default").unwrap();
    let ro = Registry::open_read_only(f.dir.path()).unwrap();
    assert_eq!(ro.list().unwrap(), f.reg.list().unwrap());
    assert_eq!(ro.alias("default").unwrap().unwrap().label(), "m:1");
}

#[test]
fn size_classes_follow_the_rounded_parameter_count() {
    for (params, class) in [
        (135_000_000, SizeClass::Micro),
        (1_449_999_999, SizeClass::Micro),
        (1_450_000_000, SizeClass::Small),
        (7_000_000_000, SizeClass::Small),
        (13_949_999_999, SizeClass::Small),
        (14_000_000_000, SizeClass::Medium),
        (30_000_000_000, SizeClass::Medium),
        (30_100_000_000, SizeClass::Large),
    ] {
        assert_eq!(SizeClass::of(params), class, "{params}");
    }
}

#[test]
fn a_verified_download_is_moved_into_place_not_copied() {
    use std::os::unix::fs::MetadataExt;
    let mut f = Fixture::new();
    let b = Fixture::salted(7);
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b.build()));
    // A wrong digest moves nothing and installs nothing.
    let p = f.file("dl.partial", &b);
    let e = f
        .reg
        .install_file(&p, &"0".repeat(64), "m", "1", ModelSource::Rollout(7))
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
    assert!(p.is_file());
    f.check("");
    // The right one: the same inode ends up in the store (a rename), the source is gone.
    let inode = std::fs::metadata(&p).unwrap().ino();
    let out = f
        .reg
        .install_file(&p, &sha, "m", "1", ModelSource::Rollout(7))
        .unwrap();
    assert!(matches!(out, ImportOutcome::Imported(_)));
    // Its provenance is the rollout that installed it.
    assert_eq!(out.record().source, "rollout:7");
    assert!(!p.exists());
    let blob = f.dir.path().join("blobs/sha256").join(&sha);
    assert_eq!(std::fs::metadata(&blob).unwrap().ino(), inode);
    f.check("m:1[]");
    // Again: already present, the new file left where it is; other bytes: refused.
    let p = f.file("dl.partial", &b);
    let again = f
        .reg
        .install_file(&p, &sha, "m", "1", ModelSource::Rollout(7))
        .unwrap();
    assert!(matches!(again, ImportOutcome::AlreadyPresent(_)));
    assert!(p.is_file());
    let other = f.file("other.partial", &Fixture::salted(8));
    let other_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(&other).unwrap(),
    ));
    let e = f
        .reg
        .install_file(&other, &other_sha, "m", "1", ModelSource::Rollout(7))
        .unwrap_err();
    assert!(matches!(e, RegistryError::VersionExists { .. }), "{e}");
    // Not a GGUF file: refused before anything moves.
    let junk = f.dir.path().join("junk.partial");
    std::fs::write(&junk, b"not a model").unwrap();
    let junk_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"not a model"));
    assert!(
        f.reg
            .install_file(&junk, &junk_sha, "j", "1", ModelSource::Rollout(7))
            .is_err()
    );
    assert!(junk.is_file());
    assert_eq!(f.blob_files(), [sha]);
}
