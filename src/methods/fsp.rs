//! FSP (flow of solution procedure): Gram matrices between consecutive spatial maps; an init stage.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::{Error, Result};
use crate::onnx::builder::GraphBuilder;
use crate::plan::connector::chw;
use crate::plan::{
    Connector, InitStage, MethodSpec, OptionValues, Side, TapKind, TapPair, TrainingStage, Weights,
    SPEC_DEFAULTS,
};

pub static SPEC: MethodSpec = MethodSpec {
    id: "fsp",
    taps: TapKind::AllSpatial,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 50.0,
    },
    init_stage: Some(InitStage {
        epochs: super::INIT_EPOCHS,
        frozen_in_main: &[],
    }),
    remark: Some("two stages: an init stage trains the student's feature layers on the FSP term over consecutive pairs of spatial maps (the larger of each pair pooled); the main stage has CE only"),
    connectors,
    ..SPEC_DEFAULTS
};

/// FSP compares Gram matrices position by position, so channel counts must agree.
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    _options: &OptionValues,
) -> Result<Vec<Connector>> {
    let (t_c, _, _) = chw(teacher)?;
    let (s_c, _, _) = chw(student)?;
    if t_c != s_c {
        return Err(Error::unsupported(format!(
            "FSP needs equal channel counts at each position, but student `{}` has {s_c} and teacher `{}` has {t_c}; \
             choose taps with matching channels with --tap, or another method",
            student.tensor, teacher.tensor
        )));
    }
    Ok(Vec::new())
}

/// Init stage: `sum_i mean((G_s,i - G_t,i)^2)` over consecutive spatial maps, with
/// `G = top bot^T / HW` after pooling the larger of the two to the smaller. No main-stage term.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    if ctx.stage == TrainingStage::Main {
        return Ok(None);
    }
    let mut terms = Vec::new();
    for (bottom, top) in pairs.iter().zip(pairs.iter().skip(1)) {
        let base = ctx.name(&format!("{}_{}", bottom.stage, top.stage));
        let mut grams = Vec::new();
        for side in [Side::Student, Side::Teacher] {
            let (bot_info, top_info) = match side {
                Side::Student => (&bottom.student, &top.student),
                Side::Teacher => (&bottom.teacher, &top.teacher),
            };
            let bot = ctx.tap(bottom, side);
            let top_tensor = ctx.tap(top, side);
            grams.push(flow_matrix(
                ctx.b,
                (&bot, bot_info),
                (&top_tensor, top_info),
                &format!("{base}/{side}"),
            )?);
        }
        terms.push(ctx.b.mse(&grams[0], &grams[1], &format!("{base}/mse")));
    }
    if terms.is_empty() {
        return Err(Error::unsupported(
            "FSP needs at least two spatial maps on each side".to_string(),
        ));
    }
    Ok(Some(ctx.b.sum_of(&terms, &ctx.name("term"))))
}

/// `top bot^T / HW` (B x C_top x C_bot) of two maps of one net, the larger pooled to the smaller.
fn flow_matrix(
    b: &mut GraphBuilder,
    bot: (&str, &TensorInfo),
    top: (&str, &TensorInfo),
    base: &str,
) -> Result<String> {
    let (bot_c, bot_h, bot_w) = chw(bot.1)?;
    let (top_c, top_h, top_w) = chw(top.1)?;
    let (h, w) = (bot_h.min(top_h), bot_w.min(top_w));
    let mut flatten = |x: &str, c: i64, size: (i64, i64), tag: &str| {
        let pooled = if size != (h, w) {
            b.adaptive_pool(x, c, size, (h, w), &format!("{base}/{tag}_pooled"))
        } else {
            x.to_string()
        };
        b.reshape(&pooled, &[-1, c, h * w], &format!("{base}/{tag}_flat"))
    };
    let bot_flat = flatten(bot.0, bot_c, (bot_h, bot_w), "bottom");
    let top_flat = flatten(top.0, top_c, (top_h, top_w), "top");
    let bot_t = b.transpose(&bot_flat, &[0, 2, 1], &format!("{base}/bottom_t"));
    let product = b.matmul(&top_flat, &bot_t, &format!("{base}/product"));
    let area = b.scalar(&format!("{base}/area"), (h * w) as f32);
    Ok(b.div(&product, &area, &format!("{base}/flow")))
}
