//! No input makes validation panic: arbitrary text and YAML-shaped mutations of a real pipeline.

use proptest::prelude::*;
use sdpipe::spec::Pipeline;

fn check(text: String) {
    let registry = sdpipe::kinds::builtin();
    let dir = std::env::temp_dir();
    let _ = Pipeline::from_source(&dir.join("fuzz.yaml"), "fuzz.yaml".into(), text, &registry, &[]);
}

const BASE: &str = "vars: {n: 3}\nstages:\n  data:\n    uses: synthetic\n    with: {count: \"${vars.n}\"}\n  s:\n    run: cat ${inputs.p} > o\n    inputs: {p: data.photos}\n    params: {x: [1, {a: b}]}\n    outs: [o]\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        check(text);
    }

    #[test]
    fn yaml_like_text_never_panics(text in "[a-z:{}\\[\\], \\n\\-\\$\\.\"'&*!|>#0-9]{0,200}") {
        check(text);
    }

    #[test]
    fn mutated_pipeline_never_panics(pos in 0usize..BASE.len(), len in 0usize..20, insert in "[a-z:{}\\[\\], \\n\\-\\$\\.\"&*]{0,8}") {
        let mut text = BASE.to_string();
        let end = (pos + len).min(text.len());
        if text.is_char_boundary(pos) && text.is_char_boundary(end) {
            text.replace_range(pos..end, &insert);
        }
        check(text);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = format!(
        "stages:\n  a:\n    run: echo\n    params: {{x: {}1{}}}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    check(deep);
}

#[test]
fn huge_numbers_are_rejected_cleanly() {
    let registry = sdpipe::kinds::builtin();
    let text = "stages:\n  d:\n    uses: synthetic\n    with: {count: 99999999999999999999999}\n"
        .to_string();
    let err = Pipeline::from_source(
        std::path::Path::new("/tmp/x.yaml"),
        "x.yaml".into(),
        text,
        &registry,
        &[],
    )
    .err()
    .expect("must be rejected");
    assert!(err.to_string().contains("count"), "{err}");
}
