//! `kdgraph grad` and `kdgraph run` as a user meets them: what they write, and one `error:` line
//! with the right exit code, and nothing written, for every kind of bad request.

mod common;

use common::*;
use kdgraph::pb;

/// The MLP with its logits replaced by `Acos(logits)`: an operator kdgraph has no rule for.
fn mlp_with_acos() -> pb::ModelProto {
    let mut model = mlp();
    let graph = model.graph.as_mut().unwrap();
    graph.node.last_mut().unwrap().output[0] = "pre".into();
    graph
        .node
        .push(node("Acos", "/odd/Acos", &["pre"], &["logits"], vec![]));
    model
}

#[test]
fn grad_needs_an_objective() {
    let dir = TempDir::new("grad_objective");
    let name = dir.write_model("mlp.onnx", &mlp());
    let run = kdgraph_in(dir.path(), ["grad", &name]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--labels") && run.stderr.contains("--loss"));
    assert_eq!(dir.listing(), ["mlp.onnx"]);
}

#[test]
fn grad_writes_a_graph_and_its_sidecar() {
    let dir = TempDir::new("grad_mlp");
    let name = dir.write_model("mlp.onnx", &mlp());
    let run = kdgraph_in(dir.path(), ["grad", &name, "--labels", "-o", "g.onnx"]);
    run.success();
    assert!(
        run.stdout.contains("wrote g.onnx (3 gradients"),
        "{}",
        run.stdout
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("g.json")).unwrap()).unwrap();
    let parameters: Vec<&str> = sidecar["gradients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["parameter"].as_str().unwrap())
        .collect();
    assert_eq!(parameters, ["fc1.weight", "fc1.bias", "fc2.weight"]);
    assert_eq!(sidecar["loss"], "loss");
}

#[test]
fn grad_refuses_unknown_outputs_and_parameters() {
    let dir = TempDir::new("grad_names");
    let name = dir.write_model("mlp.onnx", &mlp());
    kdgraph_in(dir.path(), ["grad", &name, "--loss", "nope"]).error(2, &["`nope`", "logits"]);
    kdgraph_in(
        dir.path(),
        ["grad", &name, "--labels", "--wrt", "fc9.weight"],
    )
    .error(2, &["`fc9.weight`", "--wrt"]);
    assert_eq!(dir.listing(), ["mlp.onnx"]);
}

#[test]
fn grad_names_the_node_without_a_rule() {
    let dir = TempDir::new("grad_rule");
    let name = dir.write_model("odd.onnx", &mlp_with_acos());
    let line = kdgraph_in(dir.path(), ["grad", &name, "--labels"])
        .error(1, &["`/odd/Acos`", "Acos", "no gradient rule"])
        .to_string();
    assert!(line.contains("ONNX Runtime Training"), "{line}");
    assert_eq!(dir.listing(), ["odd.onnx"]);
}

#[test]
fn grad_never_overwrites_its_input() {
    let dir = TempDir::new("grad_overwrite");
    let name = dir.write_model("mlp.onnx", &mlp());
    let before = std::fs::read(dir.join("mlp.onnx")).unwrap();
    kdgraph_in(dir.path(), ["grad", &name, "--labels", "-o", &name]).error(2, &["`mlp.onnx`"]);
    assert_eq!(std::fs::read(dir.join("mlp.onnx")).unwrap(), before);
}

#[test]
fn run_refuses_bad_arrays() {
    let dir = TempDir::new("run_bad");
    let name = dir.write_model("mlp.onnx", &mlp());
    dir.write("not.npz", b"not a zip file");
    kdgraph_in(
        dir.path(),
        ["run", &name, "--inputs", "not.npz", "-o", "out.npz"],
    )
    .error(1, &["`not.npz`", ".npz"]);
    kdgraph_in(
        dir.path(),
        ["run", &name, "--inputs", "missing.npz", "-o", "out.npz"],
    )
    .error(1, &["`missing.npz`"]);
    kdgraph_in(dir.path(), ["run", &name, "--inputs", &name, "-o", &name])
        .error(2, &["`mlp.onnx`"]);
    assert_eq!(dir.listing(), ["mlp.onnx", "not.npz"]);
}
