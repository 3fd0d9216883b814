//! Helpers for the command-line tests: running the binary, temporary folders, snapshots of
//! whole outputs, and tiny ONNX models built from the protobuf types.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use kdgraph::pb;
use prost::Message;

/// The repository root: fixtures and snapshots are found from here, and commands run here by default.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub const TEACHER: &str = "fixtures/resnet56.onnx";
pub const STUDENT: &str = "fixtures/resnet20.onnx";

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub command: String,
    /// None when the process was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Fails unless the command exited with 0 and printed nothing on stderr.
    pub fn success(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "`{}` failed:\n{}",
            self.command,
            self.stderr
        );
        assert!(
            self.stderr.is_empty(),
            "`{}` printed on stderr:\n{}",
            self.command,
            self.stderr
        );
        self
    }

    /// Fails unless the command exited with `code`, printed nothing on stdout and exactly one
    /// line on stderr, `error: ...`, that contains every one of `names`; and did not panic.
    /// Returns that line.
    pub fn error(&self, code: i32, names: &[&str]) -> &str {
        error_line(self, code, names);
        assert!(
            self.stdout.is_empty(),
            "`{}` failed but printed on stdout:\n{}",
            self.command,
            self.stdout
        );
        self.stderr.strip_suffix('\n').unwrap_or(&self.stderr)
    }
}

/// Fails unless `run` ended in exactly one `error: ...` line on stderr, exit `code`, no panic,
/// and the line names each of `names`. Merge may print its plan on stdout before a write fails,
/// but never claims to have written anything. Returns the line.
pub fn error_line(run: &Run, code: i32, names: &[&str]) -> String {
    assert!(
        !run.stderr.contains("panicked"),
        "`{}` panicked:\n{}",
        run.command,
        run.stderr
    );
    assert_eq!(
        run.code,
        Some(code),
        "`{}` should exit with {code}; stdout:\n{}\nstderr:\n{}",
        run.command,
        run.stdout,
        run.stderr
    );
    let line = run.stderr.strip_suffix('\n').unwrap_or(&run.stderr);
    assert!(
        line.starts_with("error: ") && !line.contains('\n'),
        "`{}` should print one `error: ...` line on stderr, printed:\n{}",
        run.command,
        run.stderr
    );
    assert!(
        !run.stdout.contains("wrote "),
        "`{}` failed but says it wrote files:\n{}",
        run.command,
        run.stdout
    );
    for name in names {
        assert!(
            line.contains(name),
            "`{}`: the message should name `{name}`:\n{line}",
            run.command
        );
    }
    line.to_string()
}

/// Runs `kdgraph ARGS` in `dir`.
pub fn kdgraph_in<I, S>(dir: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let output = Command::new(env!("CARGO_BIN_EXE_kdgraph"))
        .args(&args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the kdgraph binary runs");
    Run {
        command: format!("kdgraph {}", shown.join(" ")),
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// Runs `kdgraph ARGS` in the repository root (so fixture paths print as `fixtures/...`).
pub fn kdgraph<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    kdgraph_in(repo(), args)
}

/// A fresh folder under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("kdgraph-cli-{}-{n}-{label}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `bytes` to `name` inside the folder and returns the name (for relative use).
    pub fn write(&self, name: &str, bytes: &[u8]) -> String {
        fs::write(self.join(name), bytes).expect("write a temp file");
        name.to_string()
    }

    /// Encodes `model` into `name` inside the folder.
    pub fn write_model(&self, name: &str, model: &pb::ModelProto) -> String {
        self.write(name, &model.encode_to_vec())
    }

    /// The names in the folder, sorted.
    pub fn listing(&self) -> Vec<String> {
        listing(&self.0)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The names in a folder (hidden ones included), sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list a folder")
        .map(|e| {
            e.expect("a folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Compares `actual` with `tests/snapshots/NAME.txt`; with KDGRAPH_BLESS=1, writes it instead.
pub fn assert_snapshot(name: &str, actual: &str) {
    let path = repo().join("tests/snapshots").join(format!("{name}.txt"));
    if std::env::var_os("KDGRAPH_BLESS").is_some_and(|v| v == "1") {
        fs::create_dir_all(path.parent().expect("snapshots folder"))
            .expect("create tests/snapshots");
        fs::write(&path, actual).expect("write the snapshot");
        return;
    }
    let bless = "if the new output is right, run `KDGRAPH_BLESS=1 cargo test --test cli` and review the diff of tests/snapshots/";
    let Ok(expected) = fs::read_to_string(&path) else {
        panic!(
            "snapshot `{}` does not exist; {bless}\n--- actual ---\n{actual}",
            path.display()
        );
    };
    if expected == actual {
        return;
    }
    let (e, a): (Vec<&str>, Vec<&str>) =
        (expected.split('\n').collect(), actual.split('\n').collect());
    let line = e
        .iter()
        .zip(&a)
        .position(|(x, y)| x != y)
        .unwrap_or(e.len().min(a.len()));
    let show = |lines: &[&str]| {
        lines
            .get(line)
            .map(|l| format!("{l:?}"))
            .unwrap_or_else(|| "<end of output>".into())
    };
    panic!(
        "snapshot `{}` differs at line {}:\n  expected: {}\n  actual:   {}\n({} lines expected, {} actual); {bless}\n--- actual ---\n{actual}",
        path.display(),
        line + 1,
        show(&e),
        show(&a),
        e.len(),
        a.len(),
    );
}

// ---------------------------------------------------------------------------------------------
// Tiny models from the protobuf types.

fn dim(d: &str) -> pb::tensor_shape_proto::Dimension {
    use pb::tensor_shape_proto::dimension::Value;
    let value = match d.parse::<i64>() {
        Ok(n) => Value::DimValue(n),
        Err(_) => Value::DimParam(d.to_string()),
    };
    pb::tensor_shape_proto::Dimension {
        value: Some(value),
        ..Default::default()
    }
}

/// A float32 value_info; dims are numbers or symbols (`"N"`).
pub fn value(name: &str, dims: &[&str]) -> pb::ValueInfoProto {
    let tensor = pb::type_proto::Tensor {
        elem_type: pb::tensor_proto::DataType::Float as i32,
        shape: Some(pb::TensorShapeProto {
            dim: dims.iter().map(|d| dim(d)).collect(),
        }),
    };
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(tensor)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A float32 initializer filled with small deterministic values.
pub fn weight(name: &str, dims: &[i64]) -> pb::TensorProto {
    let count: i64 = dims.iter().product();
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: (0..count).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect(),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_string(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_string(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attributes: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attributes,
        ..Default::default()
    }
}

/// A model around a graph: opset 17, IR version 8.
pub fn model(graph: pb::GraphProto) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: 8,
        producer_name: "kdgraph-tests".into(),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// A tiny conv net on `input` [N, 3, H, W]: a stem (Conv 3x3 3->4, Relu) at HxW, one stage
/// (Conv 3x3 stride 2 4->8, Relu) at H/2 x W/2, GlobalAveragePool, Flatten, Gemm to `classes`
/// `logits`. Its taps: stem, stage1, embedding [N, 8], logits [N, classes]. No BatchNorm.
pub fn conv_net(h: i64, w: i64, classes: i64) -> pb::ModelProto {
    let conv = |name: &str, input: &str, weight: &str, bias: &str, output: &str, stride: i64| {
        node(
            "Conv",
            name,
            &[input, weight, bias],
            &[output],
            vec![
                ints("kernel_shape", &[3, 3]),
                ints("pads", &[1, 1, 1, 1]),
                ints("strides", &[stride, stride]),
            ],
        )
    };
    let graph = pb::GraphProto {
        name: "tiny_conv".into(),
        node: vec![
            conv(
                "/stem/Conv",
                "input",
                "stem.weight",
                "stem.bias",
                "stem_conv",
                1,
            ),
            node("Relu", "/stem/Relu", &["stem_conv"], &["stem_relu"], vec![]),
            conv(
                "/stage1/Conv",
                "stem_relu",
                "stage1.weight",
                "stage1.bias",
                "stage1_conv",
                2,
            ),
            node(
                "Relu",
                "/stage1/Relu",
                &["stage1_conv"],
                &["stage1_relu"],
                vec![],
            ),
            node(
                "GlobalAveragePool",
                "/pool/GlobalAveragePool",
                &["stage1_relu"],
                &["pooled"],
                vec![],
            ),
            node(
                "Flatten",
                "/Flatten",
                &["pooled"],
                &["embedding"],
                vec![int("axis", 1)],
            ),
            node(
                "Gemm",
                "/fc/Gemm",
                &["embedding", "fc.weight", "fc.bias"],
                &["logits"],
                vec![int("transB", 1)],
            ),
        ],
        initializer: vec![
            weight("stem.weight", &[4, 3, 3, 3]),
            weight("stem.bias", &[4]),
            weight("stage1.weight", &[8, 4, 3, 3]),
            weight("stage1.bias", &[8]),
            weight("fc.weight", &[classes, 8]),
            weight("fc.bias", &[classes]),
        ],
        input: vec![value("input", &["N", "3", &h.to_string(), &w.to_string()])],
        output: vec![value("logits", &["N", &classes.to_string()])],
        ..Default::default()
    };
    model(graph)
}

/// A tiny MLP on `input` [N, 16]: MatMul, Add, Relu, MatMul to 10 `logits`. No spatial map.
pub fn mlp() -> pb::ModelProto {
    let graph = pb::GraphProto {
        name: "tiny_mlp".into(),
        node: vec![
            node(
                "MatMul",
                "/fc1/MatMul",
                &["input", "fc1.weight"],
                &["fc1_mm"],
                vec![],
            ),
            node(
                "Add",
                "/fc1/Add",
                &["fc1_mm", "fc1.bias"],
                &["fc1_out"],
                vec![],
            ),
            node("Relu", "/Relu", &["fc1_out"], &["hidden"], vec![]),
            node(
                "MatMul",
                "/fc2/MatMul",
                &["hidden", "fc2.weight"],
                &["logits"],
                vec![],
            ),
        ],
        initializer: vec![
            weight("fc1.weight", &[16, 32]),
            weight("fc1.bias", &[32]),
            weight("fc2.weight", &[32, 10]),
        ],
        input: vec![value("input", &["N", "16"])],
        output: vec![value("logits", &["N", "10"])],
        ..Default::default()
    };
    model(graph)
}

/// Deterministic pseudo-random bytes (a 64-bit LCG), so a "random" file gives the same message every run.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}
