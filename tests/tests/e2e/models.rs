//! `outpost models …` end to end: the registry through the real binary.

use crate::support::{Device, demo_model, sha256_file};
use outpost_engine::gguf::caps;
use outpost_engine::testing::GgufBuilder;

fn salted(salt: u8) -> Vec<u8> {
    let mut b = GgufBuilder::llama_like();
    b.salt = salt;
    b.build()
}

fn labels(d: &Device) -> Vec<String> {
    d.models()
        .into_iter()
        .map(|(l, a)| {
            if a.is_empty() {
                l
            } else {
                format!("{l}[{}]", a.join(","))
            }
        })
        .collect()
}

#[test]
fn a_model_lifecycle_from_import_to_gc() {
    let d = Device::new();
    let one = d.file("one.gguf", &salted(1));
    let two = d.file("two.gguf", &salted(2));
    let imported = d.import(&one, "tiny", &["--json"]).json();
    for key in [
        "name",
        "version",
        "sha256",
        "size_bytes",
        "architecture",
        "quantization",
        "parameters",
        "class",
        "context_length",
        "aliases",
        "imported_at",
        "source",
    ] {
        assert!(imported.get(key).is_some(), "missing {key} in {imported}");
    }
    assert_eq!(imported["source"], "import", "imported by hand");
    assert_eq!(imported["version"], "1");
    assert_eq!(imported["sha256"], sha256_file(&one));
    let out = d.import(&one, "tiny", &[]);
    assert!(
        out.ok().starts_with("Already imported as tiny:1"),
        "{out:?}"
    );
    d.import(&two, "tiny", &[]).ok();
    d.import(&one, "copy", &[]).ok();
    assert_eq!(labels(&d), ["copy:1", "tiny:1", "tiny:2"]);
    assert_eq!(d.blob_files().len(), 2, "same bytes are one blob");

    let table = d.run(&["models", "list"]);
    let header = table.ok().lines().next().unwrap();
    assert!(header.contains("CLASS"), "{header}");
    assert!(header.ends_with("SOURCE"), "{header}");
    assert!(table.stdout.contains("micro"), "{table:?}");

    let sha = imported["sha256"].as_str().unwrap();
    let show = d
        .run(&[
            "models",
            "show",
            &format!("sha256:{}", &sha[..12]),
            "--json",
        ])
        .json();
    assert_eq!(show["sha256"], sha);
    assert_eq!(
        d.run(&["models", "show", "tiny", "--json"]).json()["version"],
        "2"
    );

    d.run(&["models", "activate", "tiny:1"]).ok();
    let out = d.run(&["models", "activate", "tiny:2"]);
    assert!(
        out.ok()
            .contains("Activated tiny:2 as 'default' (was tiny:1)"),
        "{out:?}"
    );
    d.run(&["models", "activate", "copy", "--alias", "chat"])
        .ok();
    assert_eq!(labels(&d), ["copy:1[chat]", "tiny:1", "tiny:2[default]"]);
    d.run(&["models", "rollback"]).ok();
    assert_eq!(labels(&d), ["copy:1[chat]", "tiny:1[default]", "tiny:2"]);
    d.run(&["models", "rollback"])
        .fails(1, "alias 'default' has no earlier model");

    d.run(&["models", "remove", "tiny:1"])
        .fails(1, "is active as default");
    assert_eq!(d.blob_files().len(), 2);
    d.run(&["models", "remove", "tiny:1", "--force"]).ok();
    // tiny:1 shared its blob with copy:1, so the blob stays.
    assert_eq!(d.blob_files().len(), 2);
    d.run(&["models", "remove", "copy", "--force"]).ok();
    assert_eq!(d.blob_files().len(), 1);
    assert_eq!(labels(&d), ["tiny:2"]);

    std::fs::write(d.data.join("blobs/sha256").join("0".repeat(64)), b"orphan").unwrap();
    let gc = d.run(&["models", "gc", "--json"]).json();
    assert_eq!(gc["blobs_removed"][0], "0".repeat(64));
    assert_eq!(d.blob_files().len(), 1);
}

#[test]
fn unknown_and_malformed_references_are_clear_errors() {
    let d = Device::new();
    d.run(&["models", "show", "nothing"])
        .fails(1, "no model matches 'nothing'");
    d.run(&["models", "show", "sha256:abc"])
        .fails(1, "invalid model reference 'sha256:abc'");
    d.run(&["models", "activate", "x:y:z"])
        .fails(1, "invalid model reference");
    d.run(&["models", "remove", "ghost:3"])
        .fails(1, "no model matches 'ghost:3'");
}

/// Every hostile file: a one-line error, a non-zero exit, no change, no temp file left.
#[test]
fn hostile_files_change_nothing() {
    let d = Device::new();
    let good = d.file("good.gguf", &salted(0));
    d.import(&good, "good", &[]).ok();
    let before_blobs = d.blob_files();

    let mut truncated = GgufBuilder::llama_like();
    truncated.truncate_data_by = 100;
    let mut header_cut = GgufBuilder::llama_like().build();
    header_cut.truncate(40);
    let mut huge_tensors = GgufBuilder::llama_like().build();
    huge_tensors[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut huge_kv = GgufBuilder::llama_like().build();
    huge_kv[16..24].copy_from_slice(&(caps::MAX_KV + 1).to_le_bytes());
    let mut huge_string = GgufBuilder::new("llama");
    huge_string.raw_kv_string_len("general.name", u64::MAX / 2);
    let mut huge_array = GgufBuilder::new("llama");
    huge_array.raw_kv_array("tokenizer.ggml.tokens", 8, caps::MAX_ARRAY_LEN + 1);
    let mut past_end = GgufBuilder::llama_like();
    past_end.offset_override = Some((2, 1 << 30));
    let mut bad_type = GgufBuilder::new("llama");
    bad_type.tensor("w", &[32, 2], 200);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "text.gguf",
            b"hello, I am not a model".to_vec(),
            "not a GGUF file",
        ),
        ("empty.gguf", Vec::new(), "truncated GGUF"),
        ("truncated.gguf", truncated.build(), "lies outside the file"),
        ("header-cut.gguf", header_cut, "truncated GGUF"),
        (
            "tensors.gguf",
            huge_tensors,
            "tensor count is 18446744073709551615, above the cap",
        ),
        ("kv.gguf", huge_kv, "metadata count is 65537, above the cap"),
        ("string.gguf", huge_string.build(), "above the cap"),
        ("array.gguf", huge_array.build(), "above the cap"),
        ("past-end.gguf", past_end.build(), "lies outside the file"),
        (
            "type.gguf",
            bad_type.build(),
            "unknown ggml tensor type 200",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = d.file(name, &bytes);
        let out = d.import(&path, "bad", &[]);
        out.fails(1, expect);
        assert!(
            out.stderr.contains(name),
            "the error names the file: {out:?}"
        );
        assert_eq!(labels(&d), ["good:1"], "{name}");
        assert_eq!(d.blob_files(), before_blobs, "{name} left something behind");
    }
    let missing = d.root.path().join("missing.gguf");
    d.import(&missing, "bad", &[])
        .fails(1, "No such file or directory");
    assert_eq!(labels(&d), ["good:1"]);
}

#[test]
fn the_real_smollm2_file_reads_as_llama_q4_1_with_135m_parameters() {
    let Some(path) = demo_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let d = Device::new();
    let m = d.import(&path, "smollm2", &["--json"]).json();
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["quantization"], "q4_1");
    assert_eq!(m["class"], "micro");
    assert_eq!(m["size_bytes"], 98_362_432u64);
    assert_eq!(m["context_length"], 8192);
    assert_eq!(
        m["sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    let params = m["parameters"].as_u64().unwrap();
    assert!((130_000_000..140_000_000).contains(&params), "{params}");
    let show = d.run(&["models", "show", "smollm2"]);
    assert!(
        show.ok().contains("parameters    134515008 (135M)"),
        "{show:?}"
    );
}

#[test]
fn the_real_gemma3_file_reads_as_gemma3_q4_k_m() {
    let Some(path) = demo_model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let d = Device::new();
    let m = d.import(&path, "gemma3", &["--json"]).json();
    assert_eq!(m["architecture"], "gemma3");
    assert_eq!(m["quantization"], "q4_k_m");
    assert_eq!(m["class"], "micro");
    let params = m["parameters"].as_u64().unwrap();
    assert!((260_000_000..280_000_000).contains(&params), "{params}");
}
