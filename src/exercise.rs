//! Every code path at once on one model, used as both teacher and student: decode, validate,
//! analyse, plan each method, assemble each stage. For the fuzz target and its regression tests
//! only (the `fuzz-harness` feature); not part of the library's API.

use std::path::Path;

use crate::onnx::prepare::prepare;
use crate::plan::{OptionValue, PlanOptions, TrainingStage};
use crate::sidecar::StageFiles;
use crate::{analysis, joint, methods, plan};

/// Runs the whole pipeline on `bytes` and returns the errors met, in order: the first where
/// the model itself is refused, else one per refused method or stage. A panic is a bug.
pub fn exercise(bytes: &[u8]) -> Vec<String> {
    // A folder that holds no side files, so external data never resolves.
    let loaded = match crate::onnx::io::decode_model(bytes, Path::new("/nonexistent/fuzz.onnx")) {
        Ok(loaded) => loaded,
        Err(e) => return vec![e.to_string()],
    };
    let prepared = match prepare(loaded, None) {
        Ok(prepared) => prepared,
        Err(e) => return vec![e.to_string()],
    };
    let analysis = match analysis::analyse(
        &prepared.loaded.proto,
        &prepared.loaded.modules,
        "fuzz.onnx",
    ) {
        Ok(analysis) => analysis,
        Err(e) => return vec![e.to_string()],
    };
    let files = StageFiles {
        main: "joint.onnx".into(),
        init: Some(("joint.init.onnx".into(), 30)),
    };
    let mut errors = Vec::new();
    for method in methods::all() {
        let options = PlanOptions {
            pairing: Default::default(),
            methods: vec![method.as_str().to_string()],
            taps: Vec::new(),
            gamma: None,
            alpha: None,
            betas: Vec::new(),
            temperature: 4.0,
            method_options: vec![
                ("crd-n-data".into(), OptionValue::Int(64)),
                ("crd-negatives".into(), OptionValue::Int(8)),
            ]
            .into_iter()
            .filter(|(flag, _)| method.spec().options.iter().any(|o| o.flag == flag))
            .collect(),
            teacher_batch_statistics: false,
            input_shape: None,
        };
        let plan = match plan::plan(
            analysis.clone(),
            analysis.clone(),
            &options,
            &methods::all(),
        ) {
            Ok(plan) => plan,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        for stage in [TrainingStage::Init, TrainingStage::Main] {
            if let Err(e) = joint::assemble(
                joint::Source::Borrowed(&prepared),
                joint::Source::Borrowed(&prepared),
                &plan,
                stage,
                &files,
            ) {
                errors.push(e.to_string());
            }
        }
    }
    errors
}
