//! Renderings for people and programs: text, JSON and Graphviz DOT of an analysis or a plan.

use std::fmt::Write;

use crate::analysis::{show_shape, ModelAnalysis, TensorInfo};
use crate::plan::{Pairing, Plan, TapKind};

/// `kdgraph inspect` as text.
pub fn analysis_text(a: &ModelAnalysis) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "model: {}", a.model);
    let _ = writeln!(out, "inputs:");
    for input in &a.inputs {
        let _ = writeln!(
            out,
            "  {}  {}  {}",
            input.name,
            input.dtype,
            show_shape(&input.shape)
        );
    }
    let _ = writeln!(out, "stages:");
    for stage in &a.stages {
        let pre = match &stage.pre_relu {
            Some(t) => format!("pre-ReLU `{t}`"),
            None => "no pre-ReLU tap".to_string(),
        };
        let module = stage
            .module
            .as_ref()
            .map(|m| format!("  module {m}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}  {:<7} {:<18} `{}`  ({pre}){module}",
            stage.index,
            stage.name,
            show_shape(&stage.shape),
            stage.tensor
        );
    }
    let _ = writeln!(out, "embedding: {}", tensor(&a.embedding));
    let _ = writeln!(out, "logits:    {}", tensor(&a.logits));
    lines(&mut out, "notes", &a.notes);
    out
}

fn tensor(t: &TensorInfo) -> String {
    format!("{}  `{}`", show_shape(&t.shape), t.tensor)
}

fn lines(out: &mut String, title: &str, items: &[String]) {
    if !items.is_empty() {
        let _ = writeln!(out, "{title}:");
        for item in items {
            let _ = writeln!(out, "  - {item}");
        }
    }
}

/// `kdgraph inspect --json`.
pub fn analysis_json(a: &ModelAnalysis) -> String {
    serde_json::to_string_pretty(a).expect("an analysis always serialises")
}

/// The dry-run report as text: the loss, then every pair of every method.
pub fn plan_text(plan: &Plan) -> String {
    let mut out = String::new();
    for (role, model) in [("teacher", &plan.teacher), ("student", &plan.student)] {
        let _ = writeln!(
            out,
            "{role}: {}  ({} spatial taps, embedding {}, logits {})",
            model.model,
            model.stages.len(),
            show_shape(&model.embedding.shape),
            show_shape(&model.logits.shape)
        );
    }
    let h = &plan.hyper;
    let mut terms = vec![format!("{} * CE", h.gamma)];
    if h.alpha > 0.0 {
        terms.push(format!("{} * KD(T={})", h.alpha, h.temperature));
    }
    terms.extend(
        h.beta
            .iter()
            .map(|(m, b)| format!("{b} * {}", m.as_str().to_uppercase())),
    );
    let _ = writeln!(out, "loss = {}", terms.join(" + "));
    let pairs_stage_ends = plan.methods.iter().any(|m| {
        matches!(
            m.spec().taps,
            TapKind::StageEnds | TapKind::StageEndsPreRelu | TapKind::AllSpatial
        )
    });
    if pairs_stage_ends {
        let how = match plan.pairing {
            Pairing::Position => "position",
            Pairing::Resolution => "resolution",
        };
        let _ = writeln!(out, "stage ends paired by {how} (--pairing)");
    }
    for &method in &plan.methods {
        let weight = match plan.hyper.beta.get(&method) {
            Some(b) => format!("beta {b}"),
            None => format!("alpha {}", plan.hyper.alpha),
        };
        let _ = writeln!(out, "\n{method} ({weight})");
        if let Some(remark) = method.spec().remark {
            let _ = writeln!(out, "  ({remark})");
        }
        for pair in plan.pairs.iter().filter(|p| p.method == method) {
            let _ = writeln!(out, "  {}", pair.stage);
            let origin = |stage: &str, module: &Option<String>| match module {
                Some(m) => format!("  ({stage}, module {m})"),
                None => format!("  ({stage})"),
            };
            let _ = writeln!(
                out,
                "    teacher {}{}",
                tensor(&pair.teacher),
                origin(&pair.teacher_stage, &pair.teacher_module)
            );
            let _ = writeln!(
                out,
                "    student {}{}",
                tensor(&pair.student),
                origin(&pair.student_stage, &pair.student_module)
            );
            let pool = pair
                .pool
                .as_ref()
                .map(|p| format!("{p} (adaptive average)"));
            let _ = writeln!(out, "    pool    {}", pool.as_deref().unwrap_or("none"));
            let _ = writeln!(
                out,
                "    connect {}",
                pair.connector.as_deref().unwrap_or("none")
            );
        }
    }
    out.push('\n');
    lines(&mut out, "notes", &plan.notes);
    let model_notes: Vec<String> = [&plan.teacher, &plan.student]
        .iter()
        .flat_map(|m| m.notes.iter().map(move |n| format!("{}: {n}", m.model)))
        .collect();
    lines(&mut out, "tap discovery", &model_notes);
    lines(&mut out, "warnings", &plan.warnings);
    out
}

/// The dry-run report as JSON.
pub fn plan_json(plan: &Plan) -> String {
    serde_json::to_string_pretty(plan).expect("a plan always serialises")
}

/// Both models' chains of taps as Graphviz clusters, with the chosen pairs drawn between them.
pub fn plan_dot(plan: &Plan) -> String {
    let mut out = String::from("digraph kdgraph {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    let mut drawn = std::collections::HashSet::new();
    for (role, model) in [("teacher", &plan.teacher), ("student", &plan.student)] {
        let _ = writeln!(
            out,
            "  subgraph cluster_{role} {{\n    label={};",
            quote(&format!("{role}: {}", model.model))
        );
        let mut chain: Vec<(String, TensorInfo, String)> = model
            .stages
            .iter()
            .map(|s| (s.name.clone(), s.info(), s.tensor.clone()))
            .collect();
        chain.push((
            "embedding".into(),
            model.embedding.clone(),
            model.embedding.tensor.clone(),
        ));
        chain.push((
            "logits".into(),
            model.logits.clone(),
            model.logits.tensor.clone(),
        ));
        for (name, info, tensor) in &chain {
            drawn.insert(format!("{role}:{tensor}"));
            let label = format!("{name}\n{}\n{tensor}", show_shape(&info.shape));
            let _ = writeln!(
                out,
                "    {} [label={}];",
                quote(&format!("{role}:{tensor}")),
                quote(&label)
            );
        }
        for pair in chain.windows(2) {
            let _ = writeln!(
                out,
                "    {} -> {};",
                quote(&format!("{role}:{}", pair[0].2)),
                quote(&format!("{role}:{}", pair[1].2))
            );
        }
        out.push_str("  }\n");
    }
    for pair in &plan.pairs {
        let (t, s) = (&pair.teacher.tensor, &pair.student.tensor);
        // Pre-ReLU and hand-picked taps are not on the chain: give them a node of their own.
        for (role, info, model) in [
            ("teacher", &pair.teacher, &plan.teacher),
            ("student", &pair.student, &plan.student),
        ] {
            let id = format!("{role}:{}", info.tensor);
            if drawn.insert(id.clone()) {
                let label = format!("{}\n{}", show_shape(&info.shape), info.tensor);
                let _ = writeln!(
                    out,
                    "  {} [label={}, style=dotted];",
                    quote(&id),
                    quote(&label)
                );
                // A pre-ReLU tap feeds its stage's end.
                if let Some(stage) = model
                    .stages
                    .iter()
                    .find(|s| s.pre_relu.as_deref() == Some(info.tensor.as_str()))
                {
                    let end = quote(&format!("{role}:{}", stage.tensor));
                    let _ = writeln!(
                        out,
                        "  {} -> {end} [style=dotted, label=\"ReLU\"];",
                        quote(&id)
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "  {} -> {} [dir=none, style=dashed, color=blue, label={}];",
            quote(&format!("teacher:{t}")),
            quote(&format!("student:{s}")),
            quote(pair.method.as_str())
        );
    }
    out.push_str("}\n");
    out
}

fn quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}
