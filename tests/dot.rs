//! `merge --dot`: the picture of a plan. Every tap is a box inside its own model's cluster, every
//! pair an edge from the teacher's box to the student's; `.svg` is rendered by Graphviz when it
//! is installed (these checks skip, saying so, where it is not), at A4 width, and refused in one
//! line, before any model is read, where it is not.

#[allow(dead_code)]
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use common::*;
use serde_json::Value;

const TEACHER: &str = "fixtures/resnet56.onnx";
const STUDENT: &str = "fixtures/resnet20.onnx";
/// A4's width (595 pt) less 1.25 cm margins each side.
const A4_TEXT_WIDTH_PT: f64 = 524.0;

/// The plan as JSON and the DOT text written beside it, for `merge TEACHER STUDENT EXTRA`.
fn plan_and_dot(dir: &TempDir, extra: &[&str]) -> (Value, String) {
    let dot = dir.join("plan.dot");
    let mut args = vec!["merge", TEACHER, STUDENT, "--dry-run", "--json", "--dot"];
    args.push(dot.to_str().unwrap());
    args.extend(extra);
    let run = kdgraph(&args);
    run.success();
    let plan = serde_json::from_str(&run.stdout).expect("--json prints JSON");
    (
        plan,
        fs::read_to_string(&dot).expect("the dot file is written"),
    )
}

/// The lines of the cluster of `role`, and the lines outside both clusters.
fn split(dot: &str, role: &str) -> (Vec<String>, Vec<String>) {
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    let mut current: Option<String> = None;
    for line in dot.lines() {
        if let Some(name) = line.trim().strip_prefix("subgraph cluster_") {
            current = Some(name.trim_end_matches(" {").to_string());
        } else if line == "  }" {
            current = None;
        } else if current.as_deref() == Some(role) {
            inside.push(line.to_string());
        } else if current.is_none() {
            outside.push(line.to_string());
        }
    }
    (inside, outside)
}

fn declared(lines: &[String], role: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix(&format!("\"{role}:"))?;
            let (tensor, tail) = rest.split_once('"')?;
            tail.starts_with(" [label=").then(|| tensor.to_string())
        })
        .collect()
}

fn check_boxes_and_edges(plan: &Value, dot: &str) {
    let pairs = plan["pairs"].as_array().expect("pairs");
    for role in ["teacher", "student"] {
        let (inside, outside) = split(dot, role);
        let boxes = declared(&inside, role);
        let unique: BTreeSet<&String> = boxes.iter().collect();
        assert_eq!(
            unique.len(),
            boxes.len(),
            "{role}: a box drawn twice:\n{dot}"
        );
        assert!(
            declared(&outside, role).is_empty(),
            "{role}: a box outside its cluster:\n{dot}"
        );
        for pair in pairs {
            let tensor = pair[role]["tensor"].as_str().unwrap().to_string();
            assert!(
                boxes.contains(&tensor),
                "{role} tap `{tensor}` is not in the {role}'s box:\n{dot}"
            );
        }
    }
    let (_, outside) = split(dot, "teacher");
    let edges: BTreeSet<(String, String)> = pairs
        .iter()
        .map(|p| {
            (
                p["teacher"]["tensor"].as_str().unwrap().to_string(),
                p["student"]["tensor"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let drawn = outside.iter().filter(|l| l.contains(" -> ")).count();
    assert_eq!(drawn, edges.len(), "one edge per pair of tensors:\n{dot}");
    for (t, s) in &edges {
        let edge = format!("\"teacher:{t}\":e -> \"student:{s}\":w");
        let line = outside.iter().find(|l| l.contains(&edge));
        let line = line.unwrap_or_else(|| panic!("no edge {edge}:\n{dot}"));
        for method in pairs
            .iter()
            .filter(|p| p["teacher"]["tensor"] == *t && p["student"]["tensor"] == *s)
        {
            let name = method["method"].as_str().unwrap();
            assert!(
                line.contains(name),
                "edge {edge} does not name {name}: {line}"
            );
        }
    }
}

#[test]
fn every_tap_is_a_box_in_its_models_cluster_and_every_pair_an_edge() {
    let dir = TempDir::new("dot-pairs");
    // OFD and AB read pre-ReLU points, off the chain of stage ends; KD the logits.
    let (plan, dot) = plan_and_dot(&dir, &["-m", "kd", "-m", "at", "-m", "ofd"]);
    check_boxes_and_edges(&plan, &dot);
    assert!(dot.contains("pre-ReLU"), "{dot}");
    // Taps chosen with --tap, by module path and by tensor name, off the chain.
    let (plan, dot) = plan_and_dot(
        &dir,
        &[
            "-m",
            "at",
            "-m",
            "fitnet",
            "--tap",
            "layer3.8.conv1=/layer2/layer2.1/Relu_output_0",
        ],
    );
    check_boxes_and_edges(&plan, &dot);
    assert_eq!(plan["pairs"].as_array().unwrap().len(), 2);
    assert!(
        dot.contains("fitnet, at") || dot.contains("at, fitnet"),
        "{dot}"
    );
}

fn graphviz_installed() -> bool {
    let found = Command::new("dot")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: Graphviz's `dot` is not installed");
    }
    found
}

#[test]
fn an_svg_is_rendered_at_a4_width() {
    if !graphviz_installed() {
        return;
    }
    let dir = TempDir::new("dot-svg");
    for methods in [&["kd", "at", "ofd"][..], &["vid", "fsp", "rkd"]] {
        let svg = dir.join("plan.svg");
        let mut args = vec!["merge", TEACHER, STUDENT, "--dry-run"];
        args.extend(methods.iter().flat_map(|m| ["-m", m]));
        args.extend(["--dot", svg.to_str().unwrap()]);
        kdgraph(&args).success();
        let text = fs::read_to_string(&svg).expect("the svg is written");
        let width = text
            .split_once("<svg width=\"")
            .and_then(|(_, rest)| rest.split_once("pt\""))
            .and_then(|(w, _)| w.parse::<f64>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "not an SVG with a width in pt:\n{}",
                    &text[..text.len().min(400)]
                )
            });
        assert!(
            width <= A4_TEXT_WIDTH_PT,
            "{methods:?}: the picture is {width} pt wide at its fonts' size, more than A4's {A4_TEXT_WIDTH_PT} pt"
        );
        assert_eq!(dir.listing(), ["plan.svg"], "no temporary left behind");
    }
}

#[test]
fn an_svg_without_graphviz_is_refused_before_reading_the_models() {
    let dir = TempDir::new("dot-no-graphviz");
    let empty = TempDir::new("dot-empty-path");
    let svg = dir.join("plan.svg");
    let output = Command::new(env!("CARGO_BIN_EXE_kdgraph"))
        .args([
            "merge",
            "missing-teacher.onnx",
            "missing-student.onnx",
            "-m",
            "at",
        ])
        .args(["--dry-run", "--dot", svg.to_str().unwrap()])
        .env("PATH", empty.path())
        .output()
        .expect("the kdgraph binary runs");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("plan.svg")
            && stderr.contains("Graphviz")
            && stderr.contains("--dot plan.dot"),
        "{stderr}"
    );
    assert!(dir.listing().is_empty(), "nothing written");
}
