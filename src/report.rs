//! Renderings for people and programs: text, JSON and Graphviz DOT of an analysis or a plan.

use std::fmt::Write;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::analysis::{show_shape, ModelAnalysis, TensorInfo};
use crate::error::{Error, Result};
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
        let module = module_note(&stage.module);
        let _ = writeln!(
            out,
            "  {}  {:<7} {:<18} `{}`  ({pre}){module}",
            stage.index,
            stage.name,
            show_shape(&stage.shape),
            stage.tensor
        );
    }
    let _ = writeln!(
        out,
        "embedding: {}{}",
        tensor(&a.embedding),
        module_note(&a.embedding_module)
    );
    let _ = writeln!(
        out,
        "logits:    {}{}",
        tensor(&a.logits),
        module_note(&a.logits_module)
    );
    lines(&mut out, "notes", &a.notes);
    out
}

/// `  module <path>` where the export records the module, else nothing.
fn module_note(module: &Option<String>) -> String {
    module
        .as_ref()
        .map(|m| format!("  module {m}"))
        .unwrap_or_default()
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
    let _ = writeln!(out, "{}", loss_formula(plan));
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

/// `loss = 0.1 * CE + 0.9 * KD(T=4) + 1000 * AT`.
fn loss_formula(plan: &Plan) -> String {
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
    format!("loss = {}", terms.join(" + "))
}

/// The dry-run report as JSON.
pub fn plan_json(plan: &Plan) -> String {
    serde_json::to_string_pretty(plan).expect("a plan always serialises")
}

/// Both models' chains of taps as Graphviz clusters side by side (input at the top), the chosen
/// pairs as arrows from the teacher's tap to the student's, labelled by method. A tap off the chain (a pre-ReLU point, a
/// tensor chosen with `--tap`) is a dashed box in its model's column, where the graph computes it.
pub fn plan_dot(plan: &Plan) -> String {
    let mut out = String::from("digraph kdgraph {\n");
    let _ = writeln!(
        out,
        "  rankdir=TB; nodesep=0.25; ranksep=0.25; labelloc=t; fontname=\"Helvetica\"; fontsize=12;\n  \
         label={};\n  node [shape=box, style=rounded, fontname=\"Helvetica\", fontsize=10, margin=\"0.08,0.03\"];\n  \
         edge [arrowsize=0.6, fontname=\"Helvetica\"];",
        quote(&loss_formula(plan))
    );
    for (role, model) in [("teacher", &plan.teacher), ("student", &plan.student)] {
        draw_model(&mut out, plan, role, model);
    }
    // One edge per pair of tensors, labelled with every method that compares them.
    let mut edges: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for pair in &plan.pairs {
        let (t, s) = (pair.teacher.tensor.as_str(), pair.student.tensor.as_str());
        match edges.iter_mut().find(|(et, es, _)| (*et, *es) == (t, s)) {
            Some((_, _, methods)) => methods.push(pair.method.as_str()),
            None => edges.push((t, s, vec![pair.method.as_str()])),
        }
    }
    for (t, s, methods) in edges {
        let _ = writeln!(
            out,
            "  {}:e -> {}:w [constraint=false, style=dashed, color=\"#1f5fbf\", fontcolor=\"#1f5fbf\", fontsize=9, label={}];",
            node_id("teacher", t),
            node_id("student", s),
            quote(&methods.join(", "))
        );
    }
    out.push_str("}\n");
    out
}

/// One model's cluster: a column of its stages, embedding and logits, with the taps off that
/// chain (dashed) inserted where the graph computes them.
fn draw_model(out: &mut String, plan: &Plan, role: &str, model: &ModelAnalysis) {
    let _ = writeln!(
        out,
        "  subgraph cluster_{role} {{\n    label={}; style=rounded; color=\"#888888\";",
        quote(&format!(
            "{role}\n{}",
            shorten(&model.model, DOT_NAME_CHARS)
        ))
    );
    let stages: Vec<TensorInfo> = model.stages.iter().map(|s| s.info()).collect();
    let mut column: Vec<(String, &TensorInfo, bool)> = model
        .stages
        .iter()
        .zip(&stages)
        .map(|(stage, info)| (stage.name.clone(), info, true))
        .collect();
    column.push(("embedding".into(), &model.embedding, true));
    column.push(("logits".into(), &model.logits, true));
    for pair in &plan.pairs {
        let info = if role == "teacher" {
            &pair.teacher
        } else {
            &pair.student
        };
        if column.iter().any(|(_, i, _)| i.tensor == info.tensor) {
            continue;
        }
        let name = match model
            .stages
            .iter()
            .find(|s| s.pre_relu.as_deref() == Some(info.tensor.as_str()))
        {
            Some(stage) => format!("{} pre-ReLU", stage.name),
            None => "--tap".to_string(),
        };
        column.push((name, info, false));
    }
    // Graph order: every tap is computed from the input, so each one is a data tensor.
    let position = |t: &str| model.data_tensors.iter().position(|d| d == t);
    column.sort_by_key(|(_, info, _)| position(&info.tensor));
    for (name, info, on_chain) in &column {
        let style = if *on_chain {
            ""
        } else {
            ", style=\"rounded,dashed\""
        };
        let _ = writeln!(
            out,
            "    {} [label={}{style}];",
            node_id(role, &info.tensor),
            quote(&tap_label(name, info, model))
        );
    }
    for pair in column.windows(2) {
        let style = if pair[0].2 && pair[1].2 {
            ""
        } else {
            " [style=dotted]"
        };
        let _ = writeln!(
            out,
            "    {} -> {}{style};",
            node_id(role, &pair[0].1.tensor),
            node_id(role, &pair[1].1.tensor)
        );
    }
    out.push_str("  }\n");
}

/// A box's text: the tap's name and shape, its module where known, and its tensor (shortened).
fn tap_label(name: &str, info: &TensorInfo, model: &ModelAnalysis) -> String {
    let mut label = format!("{name}  {}", show_shape(&info.shape));
    if let Some(module) = model.module_of(&info.tensor) {
        let _ = write!(label, "\nmodule {module}");
    }
    let _ = write!(label, "\n{}", shorten(&info.tensor, DOT_NAME_CHARS));
    label
}

/// Longest tensor name a DOT box shows in full: two columns of boxes fit an A4 page's width.
const DOT_NAME_CHARS: usize = 30;

/// `name`, or its last `max - 1` characters after an ellipsis.
fn shorten(name: &str, max: usize) -> String {
    let count = name.chars().count();
    if count <= max {
        return name.to_string();
    }
    let tail: String = name.chars().skip(count - (max - 1)).collect();
    format!("…{tail}")
}

fn node_id(role: &str, tensor: &str) -> String {
    quote(&format!("{role}:{tensor}"))
}

/// The Graphviz output format a `--dot` file's extension asks for; None for DOT text.
pub fn graphviz_format(path: &Path) -> Option<&'static str> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    ["svg", "png", "pdf"].into_iter().find(|f| *f == extension)
}

/// Refuses a `--dot` file to render when Graphviz's `dot` cannot be run.
pub fn check_graphviz(path: &Path) -> Result<()> {
    let Some(format) = graphviz_format(path) else {
        return Ok(());
    };
    match Command::new("dot").arg("-V").output() {
        Ok(run) if run.status.success() => Ok(()),
        _ => Err(Error::usage(format!(
            "--dot `{}`: writing {} needs Graphviz's `dot` command, which is not on PATH; install Graphviz \
             (apt-get install graphviz, brew install graphviz) or write DOT text with `--dot plan.dot`",
            path.display(),
            format.to_uppercase()
        ))),
    }
}

/// DOT text rendered by Graphviz's `dot` in `format` (svg, png, pdf).
pub fn render_graphviz(dot: &str, format: &str, path: &Path) -> Result<Vec<u8>> {
    let failed = |why: String| {
        Error::io(format!(
            "--dot `{}`: Graphviz's `dot` failed: {why}",
            path.display()
        ))
    };
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    // dot reads all of its input before it writes anything.
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(dot.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    let run = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !run.status.success() {
        let stderr = String::from_utf8_lossy(&run.stderr);
        return Err(failed(
            stderr.lines().next().unwrap_or("no message").to_string(),
        ));
    }
    Ok(run.stdout)
}

fn quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}
