//! The command line as a user sees it: whole outputs pinned by snapshots (tests/snapshots/), the
//! taps of every method checked against METHODS.md and MODELS.md, and every kind of bad input
//! answered by one `error: ...` line, the right exit code and no panic.
//!
//! Re-create the snapshots after an intended change with `KDGRAPH_BLESS=1 cargo test --test cli`
//! and review `git diff tests/snapshots/`.

mod common;

use std::fs;

use common::*;
use kdgraph::pb;
use prost::Message;
use serde_json::Value;

const METHODS: [&str; 14] = [
    "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "ofd",
];

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "`{}` printed invalid JSON ({e}):\n{}",
            run.command, run.stdout
        )
    })
}

fn dry_run(methods: &[&str], extra: &[&str]) -> Run {
    let mut args = vec!["merge", TEACHER, STUDENT, "--dry-run"];
    for m in methods {
        args.extend(["--method", m]);
    }
    args.extend(extra);
    kdgraph(args)
}

/// Records a failing command and its message as a snapshot, so message wording is reviewed.
fn snapshot_error(name: &str, run: &Run) {
    let code = run
        .code
        .map(|c| c.to_string())
        .unwrap_or_else(|| "signal".into());
    assert_snapshot(
        &format!("error_{name}"),
        &format!("$ {}\nexit {code}\n{}", run.command, run.stderr),
    );
}

// ---------------------------------------------------------------------------------------------
// inspect

#[test]
fn inspect_text_resnet56() {
    let run = kdgraph(["inspect", TEACHER]);
    assert_snapshot("inspect_resnet56", &run.success().stdout);
}

#[test]
fn inspect_text_resnet20() {
    let run = kdgraph(["inspect", STUDENT]);
    assert_snapshot("inspect_resnet20", &run.success().stdout);
}

#[test]
fn inspect_json_resnet56() {
    let run = kdgraph(["inspect", TEACHER, "--json"]);
    assert_snapshot("inspect_resnet56_json", &run.success().stdout);
}

#[test]
fn inspect_json_resnet20() {
    let run = kdgraph(["inspect", STUDENT, "--json"]);
    assert_snapshot("inspect_resnet20_json", &run.success().stdout);
}

/// MODELS.md: resnet20 / resnet56 at 32x32 have stem 16x32x32, stages 16x32x32, 32x16x16,
/// 64x8x8, embedding 64 and 100 logits; the batch stays symbolic.
#[test]
fn fixture_taps_match_models_md() {
    for model in [TEACHER, STUDENT] {
        let a = json(kdgraph(["inspect", model, "--json"]).success());
        assert_eq!(a["model"], model);
        assert_eq!(
            a["inputs"][0]["shape"],
            serde_json::json!(["N", 3, 32, 32]),
            "{model}"
        );
        assert_eq!(a["inputs"][0]["dtype"], "float32", "{model}");
        let stages = a["stages"].as_array().expect("stages");
        let expected = [
            ("stem", [16, 32, 32]),
            ("stage1", [16, 32, 32]),
            ("stage2", [32, 16, 16]),
            ("stage3", [64, 8, 8]),
        ];
        assert_eq!(stages.len(), expected.len(), "{model}: {stages:?}");
        for (i, (stage, (name, chw))) in stages.iter().zip(expected).enumerate() {
            assert_eq!(stage["index"], i, "{model}");
            assert_eq!(stage["name"], name, "{model}");
            assert_eq!(
                stage["shape"],
                serde_json::json!(["N", chw[0], chw[1], chw[2]]),
                "{model} {name}"
            );
            assert!(
                stage["pre_relu"].is_string(),
                "{model} {name}: every stage of a ResNet ends in a ReLU"
            );
        }
        // Stages 1-3 end in the ReLU after a residual Add; their pre-ReLU tap is that Add.
        for stage in &stages[1..] {
            assert!(
                stage["tensor"]
                    .as_str()
                    .unwrap()
                    .ends_with("Relu_1_output_0"),
                "{model}: {stage}"
            );
            assert!(
                stage["pre_relu"]
                    .as_str()
                    .unwrap()
                    .ends_with("Add_output_0"),
                "{model}: {stage}"
            );
        }
        assert_eq!(
            a["embedding"]["shape"],
            serde_json::json!(["N", 64]),
            "{model}"
        );
        assert_eq!(
            a["logits"],
            serde_json::json!({"tensor": "logits", "shape": ["N", 100]}),
            "{model}"
        );
        assert_eq!(a["notes"], serde_json::json!([]), "{model}");
    }
}

// ---------------------------------------------------------------------------------------------
// merge --dry-run on the fixtures

macro_rules! dry_run_text {
    ($($test:ident: $method:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            let run = dry_run(&[$method], &[]);
            assert_snapshot(concat!("merge_", $method), &run.success().stdout);
        }
    )*};
}

dry_run_text! {
    merge_dry_run_kd: "kd",
    merge_dry_run_fitnet: "fitnet",
    merge_dry_run_at: "at",
    merge_dry_run_sp: "sp",
    merge_dry_run_cc: "cc",
    merge_dry_run_vid: "vid",
    merge_dry_run_rkd: "rkd",
    merge_dry_run_pkt: "pkt",
    merge_dry_run_ab: "ab",
    merge_dry_run_ft: "ft",
    merge_dry_run_fsp: "fsp",
    merge_dry_run_nst: "nst",
    merge_dry_run_crd: "crd",
    merge_dry_run_ofd: "ofd",
}

#[test]
fn merge_dry_run_kd_and_at() {
    let run = dry_run(&["kd", "at"], &[]);
    assert_snapshot("merge_kd_at", &run.success().stdout);
}

#[test]
fn merge_json_kd() {
    let run = dry_run(&["kd"], &["--json"]);
    assert_snapshot("merge_kd_json", &run.success().stdout);
}

#[test]
fn merge_json_at() {
    let run = dry_run(&["at"], &["--json"]);
    assert_snapshot("merge_at_json", &run.success().stdout);
}

#[test]
fn merge_json_ofd() {
    let run = dry_run(&["ofd"], &["--json"]);
    assert_snapshot("merge_ofd_json", &run.success().stdout);
}

#[test]
fn merge_json_kd_and_at() {
    let run = dry_run(&["kd", "at"], &["--json"]);
    assert_snapshot("merge_kd_at_json", &run.success().stdout);
    let plan = json(&run);
    assert_eq!(plan["methods"], serde_json::json!(["kd", "at"]));
    assert_eq!(plan["hyper"]["gamma"], 0.1);
    assert_eq!(plan["hyper"]["alpha"], 0.9);
    assert_eq!(plan["hyper"]["beta"], serde_json::json!({"at": 1000.0}));
}

/// `--dot FILE` writes the picture and prints the same report as without it.
#[test]
fn merge_dot_ofd() {
    let dir = TempDir::new("dot");
    let dot = dir.join("plan.dot");
    let run = dry_run(&["ofd"], &["--dot", dot.to_str().unwrap()]);
    assert_snapshot("merge_ofd", &run.success().stdout);
    assert_snapshot(
        "merge_ofd_dot",
        &fs::read_to_string(&dot).expect("the dot file is written"),
    );
    assert_eq!(
        dir.listing(),
        ["plan.dot"],
        "only the dot file, no temporary left behind"
    );
}

/// METHODS.md "Taps": which tensors each method pairs, checked against `inspect --json`,
/// and "Total loss": the default weights.
#[test]
fn every_method_taps_and_weights_follow_methods_md() {
    let teacher = json(kdgraph(["inspect", TEACHER, "--json"]).success());
    let student = json(kdgraph(["inspect", STUDENT, "--json"]).success());
    let stage = |a: &Value, i: usize| a["stages"][i]["tensor"].as_str().unwrap().to_string();
    let pre = |a: &Value, i: usize| a["stages"][i]["pre_relu"].as_str().unwrap().to_string();
    let field = |a: &Value, f: &str| a[f]["tensor"].as_str().unwrap().to_string();
    // (method, gamma, alpha, beta, the taps of one model in pairing order)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        f64,
        f64,
        Option<f64>,
        Box<dyn Fn(&Value) -> Vec<String>>,
    )> = vec![
        (
            "kd",
            0.1,
            0.9,
            None,
            Box::new(move |a| vec![field(a, "logits")]),
        ),
        (
            "fitnet",
            1.0,
            0.0,
            Some(100.0),
            Box::new(move |a| vec![stage(a, 2)]),
        ),
        (
            "at",
            1.0,
            0.0,
            Some(1000.0),
            Box::new(move |a| (1..4).map(|i| stage(a, i)).collect()),
        ),
        (
            "sp",
            1.0,
            0.0,
            Some(3000.0),
            Box::new(move |a| vec![stage(a, 3)]),
        ),
        (
            "cc",
            1.0,
            0.0,
            Some(0.02),
            Box::new(move |a| vec![field(a, "embedding")]),
        ),
        (
            "vid",
            1.0,
            0.0,
            Some(1.0),
            Box::new(move |a| (1..4).map(|i| stage(a, i)).collect()),
        ),
        (
            "rkd",
            1.0,
            0.0,
            Some(1.0),
            Box::new(move |a| vec![field(a, "embedding")]),
        ),
        (
            "pkt",
            1.0,
            0.0,
            Some(30000.0),
            Box::new(move |a| vec![field(a, "embedding")]),
        ),
        (
            "ab",
            1.0,
            0.0,
            Some(1.0),
            Box::new(move |a| (1..4).map(|i| pre(a, i)).collect()),
        ),
        (
            "ft",
            1.0,
            0.0,
            Some(200.0),
            Box::new(move |a| vec![stage(a, 3)]),
        ),
        (
            "fsp",
            1.0,
            0.0,
            Some(50.0),
            Box::new(move |a| (0..4).map(|i| stage(a, i)).collect()),
        ),
        (
            "nst",
            1.0,
            0.0,
            Some(50.0),
            Box::new(move |a| (1..4).map(|i| stage(a, i)).collect()),
        ),
        (
            "crd",
            1.0,
            0.0,
            Some(0.8),
            Box::new(move |a| vec![field(a, "embedding")]),
        ),
        (
            "ofd",
            1.0,
            0.0,
            Some(0.001),
            Box::new(move |a| (1..4).map(|i| pre(a, i)).collect()),
        ),
    ];
    assert_eq!(cases.iter().map(|c| c.0).collect::<Vec<_>>(), METHODS);
    for (method, gamma, alpha, beta, taps) in cases {
        let plan = json(dry_run(&[method], &["--json"]).success());
        assert_eq!(plan["methods"], serde_json::json!([method]), "{method}");
        assert_eq!(plan["hyper"]["gamma"], gamma, "{method}: default gamma");
        assert_eq!(plan["hyper"]["alpha"], alpha, "{method}: default alpha");
        assert_eq!(plan["hyper"]["temperature"], 4.0, "{method}: default T");
        match beta {
            Some(b) => assert_eq!(
                plan["hyper"]["beta"],
                serde_json::json!({ method: b }),
                "{method}: default beta"
            ),
            None => assert_eq!(plan["hyper"]["beta"], serde_json::json!({}), "{method}"),
        }
        let pairs = plan["pairs"].as_array().unwrap();
        let side = |role: &str| {
            pairs
                .iter()
                .map(|p| p[role]["tensor"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(side("teacher"), taps(&teacher), "{method}: teacher taps");
        assert_eq!(side("student"), taps(&student), "{method}: student taps");
        for pair in pairs {
            assert_eq!(pair["method"], method);
            // Same architecture family at the same resolution: nothing to pool.
            assert_eq!(pair["pool"], Value::Null, "{method}: {pair}");
            assert_eq!(
                pair["teacher"]["shape"], pair["student"]["shape"],
                "{method}: {pair}"
            );
        }
        // OFD says where each stage's margins come from: the committed teacher is an eval
        // export, its BatchNorms folded, so every stage uses the batch estimate.
        let notes: Vec<&str> = plan["notes"]
            .as_array()
            .expect("notes are a list")
            .iter()
            .map(|n| n.as_str().expect("a note is text"))
            .collect();
        if method == "ofd" {
            assert_eq!(notes.len(), 3, "{notes:?}");
            assert!(
                notes
                    .iter()
                    .all(|n| n.contains("margins are a batch estimate")),
                "{notes:?}"
            );
        } else {
            assert!(notes.is_empty(), "{method}: {notes:?}");
        }
        assert!(
            !plan["warnings"].to_string().contains("BatchNormalization"),
            "{method}: the student keeps its BatchNorms"
        );
    }
}

/// A dry run (text, JSON, every method) writes nothing next to the models and leaves them byte-identical.
#[test]
fn dry_run_writes_nothing_and_leaves_inputs_untouched() {
    let dir = TempDir::new("dry-run");
    let teacher = fs::read(repo().join(TEACHER)).unwrap();
    let student = fs::read(repo().join(STUDENT)).unwrap();
    dir.write("teacher.onnx", &teacher);
    dir.write("student.onnx", &student);
    let before = dir.listing();
    let fixtures_before = listing(&repo().join("fixtures"));
    kdgraph_in(dir.path(), ["inspect", "teacher.onnx"]).success();
    kdgraph_in(dir.path(), ["inspect", "student.onnx", "--json"]).success();
    for method in METHODS {
        for extra in [&[][..], &["--json"][..]] {
            let mut args = vec![
                "merge",
                "teacher.onnx",
                "student.onnx",
                "--method",
                method,
                "--dry-run",
            ];
            args.extend(extra);
            kdgraph_in(dir.path(), &args).success();
        }
    }
    kdgraph_in(
        dir.path(),
        [
            "merge",
            "teacher.onnx",
            "student.onnx",
            "-m",
            "kd",
            "-m",
            "at",
            "--dry-run",
        ],
    )
    .success();
    assert_eq!(dir.listing(), before, "a dry run created files");
    assert!(
        fs::read(dir.join("teacher.onnx")).unwrap() == teacher,
        "the teacher changed"
    );
    assert!(
        fs::read(dir.join("student.onnx")).unwrap() == student,
        "the student changed"
    );
    assert_eq!(listing(&repo().join("fixtures")), fixtures_before);
}

/// Weights given on the command line reach the plan; `--alpha` with a feature method adds KD.
#[test]
fn weights_from_the_command_line() {
    let run = dry_run(
        &["at", "ofd"],
        &[
            "--beta", "at=5", "--beta", "ofd=0.5", "--gamma", "2", "-T", "2", "--alpha", "0.3",
        ],
    );
    assert_snapshot("merge_at_ofd_weights", &run.success().stdout);
    let plan = json(&dry_run(
        &["at", "ofd"],
        &[
            "--beta", "at=5", "--beta", "ofd=0.5", "--gamma", "2", "-T", "2", "--alpha", "0.3",
            "--json",
        ],
    ));
    assert_eq!(plan["methods"], serde_json::json!(["kd", "at", "ofd"]));
    assert_eq!(
        plan["hyper"],
        serde_json::json!({"gamma": 2.0, "alpha": 0.3, "temperature": 2.0, "beta": {"at": 5.0, "ofd": 0.5}, "teacher_batch_statistics": false})
    );
    assert_eq!(
        plan["notes"][0],
        serde_json::json!("--alpha 0.3 adds the KD term on the logits")
    );
    // One method: a bare --beta is that method's weight.
    let plan = json(&dry_run(&["sp"], &["--beta", "7", "--json"]));
    assert_eq!(plan["hyper"]["beta"], serde_json::json!({"sp": 7.0}));
}

/// `--tap` replaces the automatic pairing of a feature method.
#[test]
fn tap_override() {
    let run = dry_run(
        &["fitnet"],
        &[
            "--tap",
            "/layer3/layer3.8/Relu_1_output_0=/layer2/layer2.2/Relu_1_output_0",
            "--json",
        ],
    );
    let plan = json(run.success());
    let pairs = plan["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0]["stage"], "tap1");
    assert_eq!(
        pairs[0]["teacher"]["shape"],
        serde_json::json!(["N", 64, 8, 8])
    );
    assert_eq!(
        pairs[0]["student"]["shape"],
        serde_json::json!(["N", 32, 16, 16])
    );
    assert_eq!(
        pairs[0]["connector"],
        "regressor on student: conv3x3/2 32->64 + BN + ReLU"
    );
}

// ---------------------------------------------------------------------------------------------
// Files that are not usable models: the exact messages. (Exit codes, every command and both
// roles of each bad file are tests/hostile.rs's.)

#[test]
fn missing_file() {
    let dir = TempDir::new("missing");
    let run = kdgraph_in(dir.path(), ["inspect", "nope.onnx"]);
    run.error(1, &["`nope.onnx`", "no such file"]);
    snapshot_error("missing_file", &run);
}

#[test]
fn directory_instead_of_model() {
    let dir = TempDir::new("directory");
    fs::create_dir(dir.join("model.onnx")).unwrap();
    let run = kdgraph_in(dir.path(), ["inspect", "model.onnx"]);
    run.error(1, &["`model.onnx`", "directory"]);
    snapshot_error("directory", &run);
}

#[test]
fn empty_file() {
    let dir = TempDir::new("empty");
    let name = dir.write("empty.onnx", b"");
    let run = kdgraph_in(dir.path(), ["inspect", &name]);
    run.error(1, &["`empty.onnx`", "empty"]);
    snapshot_error("empty_file", &run);
}

#[test]
fn random_bytes() {
    let dir = TempDir::new("random");
    let name = dir.write("random.onnx", &noise(4096, 7));
    let run = kdgraph_in(dir.path(), ["inspect", &name]);
    run.error(1, &["`random.onnx`"]);
    snapshot_error("random_bytes", &run);
    for seed in 1..6 {
        let name = dir.write(&format!("random{seed}.onnx"), &noise(64 << seed, seed));
        kdgraph_in(dir.path(), ["inspect", &name]).error(1, &[&format!("`{name}`")]);
    }
}

/// The student cut short: inside the first field, in the graph, and just before the end.
#[test]
fn truncated_model() {
    let dir = TempDir::new("truncated");
    let bytes = fs::read(repo().join(STUDENT)).unwrap();
    let len = bytes.len();
    for (name, cut) in [
        ("cut1", 1),
        ("cut100", 100),
        ("cuthalf", len / 2),
        ("cutend", len - 1),
    ] {
        let file = dir.write(&format!("{name}.onnx"), &bytes[..cut]);
        let run = kdgraph_in(dir.path(), ["inspect", &file]);
        run.error(1, &[&format!("`{file}`"), "truncated"]);
        snapshot_error(&format!("truncated_{name}"), &run);
    }
}

/// Cut exactly at the end of the graph field: a well-formed protobuf that lacks its opset import.
#[test]
fn truncated_at_a_field_boundary() {
    let dir = TempDir::new("boundary");
    let mut model =
        pb::ModelProto::decode(fs::read(repo().join(STUDENT)).unwrap().as_slice()).unwrap();
    let full = model.encode_to_vec();
    model.opset_import.clear();
    let cut = model.encode_to_vec();
    assert!(
        full.starts_with(&cut),
        "the fixture stores its opset import after the graph"
    );
    let name = dir.write("no_opset.onnx", &cut);
    let run = kdgraph_in(dir.path(), ["inspect", &name]);
    run.error(1, &["`no_opset.onnx`"]);
    snapshot_error("truncated_at_field_boundary", &run);
}

#[test]
fn protobuf_that_is_not_a_model() {
    let dir = TempDir::new("not-model");
    // Another message: a NodeProto does not decode as a ModelProto.
    let node = node("Relu", "relu", &["x"], &["y"], vec![]);
    let name = dir.write("node.onnx", &node.encode_to_vec());
    let run = kdgraph_in(dir.path(), ["inspect", &name]);
    run.error(1, &["`node.onnx`"]);
    snapshot_error("protobuf_node", &run);
    // A ModelProto with no graph (a model header only).
    let header = pb::ModelProto {
        graph: None,
        ..conv_net(32, 32, 10)
    };
    let name = dir.write_model("no_graph.onnx", &header);
    let run = kdgraph_in(dir.path(), ["inspect", &name]);
    run.error(1, &["`no_graph.onnx`", "no graph"]);
    snapshot_error("model_without_graph", &run);
}

#[test]
fn graph_without_nodes() {
    let dir = TempDir::new("no-nodes");
    let mut model = conv_net(32, 32, 10);
    let graph = model.graph.as_mut().unwrap();
    graph.node.clear();
    graph.initializer.clear();
    let name = dir.write_model("no_nodes.onnx", &model);
    let run = kdgraph_in(dir.path(), ["inspect", &name]);
    run.error(1, &["`no_nodes.onnx`", "no nodes"]);
    snapshot_error("graph_without_nodes", &run);
}

#[test]
fn model_without_spatial_feature_maps() {
    let dir = TempDir::new("mlp");
    let mlp = dir.write_model("mlp.onnx", &mlp());
    let conv = dir.write_model("conv.onnx", &conv_net(32, 32, 10));
    let run = kdgraph_in(dir.path(), ["inspect", &mlp]);
    run.error(1, &["`mlp.onnx`", "spatial"]);
    snapshot_error("mlp", &run);
    // In a merge, whichever side it is on.
    kdgraph_in(dir.path(), ["merge", &conv, &mlp, "-m", "kd", "--dry-run"])
        .error(1, &["`mlp.onnx`"]);
    kdgraph_in(dir.path(), ["merge", &mlp, &conv, "-m", "at", "--dry-run"])
        .error(1, &["`mlp.onnx`"]);
}

// ---------------------------------------------------------------------------------------------
// Models that are fine alone but do not go together.

#[test]
fn tiny_conv_net_is_analysed() {
    let dir = TempDir::new("tiny");
    let name = dir.write_model("tiny.onnx", &conv_net(32, 32, 10));
    let run = kdgraph_in(dir.path(), ["inspect", &name]);
    assert_snapshot("inspect_tiny_conv", &run.success().stdout);
}

#[test]
fn different_input_shapes() {
    let dir = TempDir::new("input-shapes");
    let big = dir.write_model("conv32.onnx", &conv_net(32, 32, 10));
    let small = dir.write_model("conv16.onnx", &conv_net(16, 16, 10));
    let run = kdgraph_in(dir.path(), ["merge", &big, &small, "-m", "at", "--dry-run"]);
    run.error(1, &["`input`", "[N, 3, 32, 32]", "[N, 3, 16, 16]"]);
    snapshot_error("different_input_shapes", &run);
    kdgraph_in(dir.path(), ["merge", &small, &big, "-m", "kd", "--dry-run"]).error(1, &["`input`"]);
}

#[test]
fn kd_with_different_class_counts() {
    let dir = TempDir::new("classes");
    let teacher = dir.write_model("teacher100.onnx", &conv_net(32, 32, 100));
    let student = dir.write_model("student10.onnx", &conv_net(32, 32, 10));
    let run = kdgraph_in(
        dir.path(),
        ["merge", &teacher, &student, "-m", "kd", "--dry-run"],
    );
    let line = run.error(
        1,
        &[
            "`teacher100.onnx`",
            "`student10.onnx`",
            "100",
            "10",
            "classes",
        ],
    );
    assert!(
        line.contains("feature method"),
        "the message should say what to do: {line}"
    );
    snapshot_error("kd_different_classes", &run);
    // KD added by --alpha, or listed with a feature method, fails the same way.
    kdgraph_in(
        dir.path(),
        [
            "merge",
            &teacher,
            &student,
            "-m",
            "at",
            "--alpha",
            "0.5",
            "--dry-run",
        ],
    )
    .error(1, &["classes"]);
    kdgraph_in(
        dir.path(),
        [
            "merge",
            &teacher,
            &student,
            "-m",
            "at",
            "-m",
            "kd",
            "--dry-run",
        ],
    )
    .error(1, &["classes"]);
    // Feature methods do not read the logits and still work.
    let run = kdgraph_in(
        dir.path(),
        ["merge", &teacher, &student, "-m", "at", "--dry-run"],
    );
    assert_snapshot("merge_tiny_at_different_classes", &run.success().stdout);
    for method in ["sp", "rkd", "pkt", "nst", "ofd"] {
        kdgraph_in(
            dir.path(),
            [
                "merge",
                &teacher,
                &student,
                "-m",
                method,
                "--dry-run",
                "--json",
            ],
        )
        .success();
    }
}

// ---------------------------------------------------------------------------------------------
// Usage errors (exit 2).

#[test]
fn unknown_method() {
    let run = kdgraph(["merge", TEACHER, STUDENT, "--method", "bogus", "--dry-run"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(
        run.stderr.starts_with("error: ") && run.stderr.contains("'bogus'"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("kd, fitnet, at"),
        "clap lists the methods: {}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
}

#[test]
fn method_is_required() {
    let run = kdgraph(["merge", TEACHER, STUDENT, "--dry-run"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.starts_with("error: ") && run.stderr.contains("--method"),
        "{}",
        run.stderr
    );
}

#[test]
fn tap_naming_a_missing_tensor() {
    let run = dry_run(
        &["at"],
        &[
            "--tap",
            "/layer1/layer1.8/Relu_1_output_0=/layer1/layer1.2/Relu_1_outpt_0",
        ],
    );
    let line = run.error(
        2,
        &[
            &format!("`{STUDENT}`"),
            "`/layer1/layer1.2/Relu_1_outpt_0`",
            "nearest",
        ],
    );
    assert!(
        line.contains("`/layer1/layer1.2/Relu_1_output_0`"),
        "the closest name comes first: {line}"
    );
    snapshot_error("tap_missing_student_tensor", &run);
    let run = dry_run(
        &["at"],
        &["--tap", "layer3_out=/layer3/layer3.2/Relu_1_output_0"],
    );
    run.error(2, &[&format!("`{TEACHER}`"), "`layer3_out`", "nearest"]);
    // Not of the form T=S: clap refuses it.
    let run = dry_run(&["at"], &["--tap", "=x"]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("TEACHER=STUDENT"), "{}", run.stderr);
}

#[test]
fn temperature_must_be_positive() {
    let run = dry_run(&["kd"], &["-T", "0"]);
    run.error(2, &["-T", "> 0"]);
    snapshot_error("temperature_zero", &run);
    dry_run(&["kd"], &["--temperature=-1"]).error(2, &["-T"]);
    dry_run(&["kd"], &["-T", "nan"]).error(2, &["-T"]);
}

#[test]
fn negative_weights() {
    let run = dry_run(&["kd"], &["--alpha=-1"]);
    run.error(2, &["--alpha", "-1"]);
    snapshot_error("alpha_negative", &run);
    dry_run(&["at"], &["--gamma=-0.5"]).error(2, &["--gamma"]);
    dry_run(&["at"], &["--beta=-3"]).error(2, &["--beta"]);
    dry_run(&["at"], &["--beta", "inf"]).error(2, &["--beta"]);
    // Without `=`, clap takes `-1` for a flag; still a usage error, never a plan.
    let run = dry_run(&["kd"], &["--alpha", "-1"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stdout.is_empty() && !run.stderr.contains("panicked"),
        "{run:?}"
    );
}

#[test]
fn bare_beta_with_two_feature_methods() {
    let run = dry_run(&["at", "ofd"], &["--beta", "5"]);
    let line = run.error(2, &["--beta 5", "ambiguous"]);
    assert!(
        line.contains("--beta at=5"),
        "the message should show the METHOD=B form: {line}"
    );
    snapshot_error("beta_ambiguous", &run);
    // A METHOD=B for a method that is not chosen, or for KD (weighted by --alpha).
    dry_run(&["at"], &["--beta", "ofd=5"]).error(2, &["ofd"]);
    dry_run(&["kd"], &["--beta", "kd=1"]).error(2, &["kd"]);
    let run = dry_run(&["at"], &["--beta", "xyz=1"]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("`xyz` is not a method"),
        "{}",
        run.stderr
    );
}

#[test]
fn dot_into_a_missing_folder() {
    let dir = TempDir::new("dot-missing");
    let dot = dir.join("missing/plan.dot");
    let run = dry_run(&["at"], &["--dot", dot.to_str().unwrap()]);
    run.error(2, &["plan.dot", "does not exist"]);
    assert_eq!(dir.listing(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Once bugs (now fixed): --dot may not replace an input; a repeated method is planned once.

#[test]
fn dot_never_overwrites_an_input() {
    let dir = TempDir::new("dot-input");
    let student = fs::read(repo().join(STUDENT)).unwrap();
    dir.write("teacher.onnx", &fs::read(repo().join(TEACHER)).unwrap());
    dir.write("student.onnx", &student);
    let run = kdgraph_in(
        dir.path(),
        [
            "merge",
            "teacher.onnx",
            "student.onnx",
            "-m",
            "at",
            "--dry-run",
            "--dot",
            "student.onnx",
        ],
    );
    let untouched = fs::read(dir.join("student.onnx")).unwrap() == student;
    assert!(
        untouched,
        "--dot replaced the student model with a Graphviz file"
    );
    run.error(2, &["`student.onnx`"]);
}

#[test]
fn repeated_method_is_planned_once() {
    let plan = json(&dry_run(&["at", "kd", "at"], &["--json"]));
    assert_eq!(plan["methods"], serde_json::json!(["kd", "at"]));
    assert_eq!(plan["pairs"].as_array().unwrap().len(), 4);
}

#[test]
fn tap_must_be_a_feature_map_for_at() {
    for tap in ["fc.weight=fc.weight", "logits=logits"] {
        let run = dry_run(&["at"], &["--tap", tap]);
        assert_ne!(
            run.code,
            Some(0),
            "`{}` planned AT on a non-spatial tensor:\n{}",
            run.command,
            run.stdout
        );
    }
}
