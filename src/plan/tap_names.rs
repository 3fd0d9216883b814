//! What one side of `--tap TEACHER=STUDENT` names: a tensor, a module path (its output), or with
//! the role's prefix a stage index (`teacher:3`) or any of these (`student:layer2`).

use crate::analysis::{ModelAnalysis, TensorInfo};
use crate::error::{Error, Result};
use crate::suggest::nearest;

/// The tensor `given` names in `model` (the `role`'s model), and a note for the report where a
/// module path had to be resolved to one of its tensors.
pub fn resolve(
    model: &ModelAnalysis,
    role: &str,
    given: &str,
) -> Result<(TensorInfo, Option<String>)> {
    // A tensor may itself be called `teacher:...`: exact names come first.
    if let Some(info) = model.data_info(given) {
        return Ok((info, None));
    }
    let other = if role == "teacher" {
        "student"
    } else {
        "teacher"
    };
    if given.starts_with(&format!("{other}:")) {
        return Err(Error::usage(format!(
            "--tap `{given}`: the teacher's tap goes left of `=`, the student's right \
             (--tap teacher:3=student:2)"
        )));
    }
    let (name, prefixed) = match given.strip_prefix(&format!("{role}:")) {
        Some(rest) => (rest, true),
        None => (given, false),
    };
    if prefixed {
        if let Ok(index) = name.parse::<usize>() {
            return model
                .stages
                .get(index)
                .map(|stage| (stage.info(), None))
                .ok_or_else(|| {
                    Error::usage(format!(
                        "--tap: {role} `{}` has stages 0 to {} (`kdgraph inspect` lists them), not {index}",
                        model.model,
                        model.stages.len() - 1
                    ))
                });
        }
        if let Some(info) = model.data_info(name) {
            return Ok((info, None));
        }
    }
    if let Some(info) = model.module_output(name) {
        let note = format!(
            "--tap: {role} module `{name}` names `{}` {}, its last tensor on the main path",
            info.tensor,
            crate::analysis::show_shape(&info.shape)
        );
        return Ok((info, Some(note)));
    }
    Err(Error::usage(format!(
        "--tap: {role} `{}` has no tensor or module `{name}`; nearest names: {}",
        model.model,
        suggestions(model, name)
    )))
}

/// The module paths (where the export records any) and tensor names nearest to a wrong name.
fn suggestions(model: &ModelAnalysis, name: &str) -> String {
    let paths = model.module_paths();
    let names = paths.iter().chain(&model.data_tensors).map(String::as_str);
    nearest(name, names, 3)
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
