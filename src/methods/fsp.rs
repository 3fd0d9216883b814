//! FSP (flow of solution procedure): Gram matrices between consecutive spatial maps; an init stage.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::{Error, Result};
use crate::onnx::builder::GraphBuilder;
use crate::plan::connector::chw;
use crate::plan::{
    option_value, Connector, ConvInit, InitStage, Layer, MethodSpec, OptionKind, OptionSpec,
    OptionValue, OptionValues, Side, TapKind, TapPair, TrainingStage, Weights, SPEC_DEFAULTS,
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
    options: &OPTIONS,
    connectors,
    ..SPEC_DEFAULTS
};

static OPTIONS: [OptionSpec; 1] = [OptionSpec {
    flag: "fsp-connectors",
    key: "connectors",
    value_name: "",
    help:
        "where channel counts differ, map each student map to the teacher's channels with a \
           1x1 conv + BN trained in the init stage (not in the reference, which needs equal counts)",
    default: Some(OptionValue::Flag(false)),
    kind: OptionKind::Flag,
    min: 0.0,
    max: 1.0,
}];

/// FSP compares Gram matrices position by position, so channel counts must agree; with
/// --fsp-connectors a student map of another width goes through a 1x1 conv + BN first.
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    options: &OptionValues,
) -> Result<Vec<Connector>> {
    let (t_c, _, _) = chw(teacher)?;
    let (s_c, _, _) = chw(student)?;
    if t_c == s_c {
        return Ok(Vec::new());
    }
    let wanted = option_value(options, "connectors") == Some(OptionValue::Flag(true));
    if !wanted {
        return Err(Error::unsupported(format!(
            "FSP needs equal channel counts at each position, but student `{}` has {s_c} and teacher `{}` has {t_c}; \
             pass --fsp-connectors to map the student's channels with a trained 1x1 conv + BN, choose taps with \
             matching channels with --tap, or use another method",
            student.tensor, teacher.tensor
        )));
    }
    Ok(vec![Connector {
        name: "connector",
        side: Side::Student,
        layers: vec![
            Layer::Conv {
                in_channels: s_c,
                out_channels: t_c,
                kernel: [1, 1],
                stride: 1,
                pad: 0,
                bias: false,
                init: ConvInit::TorchDefault,
            },
            Layer::BatchNorm { channels: t_c },
        ],
    }])
}

/// Init stage: `sum_i mean((G_s,i - G_t,i)^2)` over consecutive spatial maps, with
/// `G = top bot^T / HW` after pooling the larger of the two to the smaller. No main-stage term.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    if ctx.stage == TrainingStage::Main {
        return Ok(None);
    }
    // Each map once: a map is the top of one pair and the bottom of the next, and with
    // --fsp-connectors a second ctx.tap would give it a second, independently trained connector.
    let sides = [Side::Student, Side::Teacher];
    let maps: Vec<Vec<(String, (i64, i64, i64))>> = pairs
        .iter()
        .map(|pair| {
            sides
                .iter()
                .map(|&side| (ctx.tap(pair, side), ctx.tap_chw(pair, side)))
                .collect()
        })
        .collect();
    let mut terms = Vec::new();
    for (i, (bottom, top)) in pairs.iter().zip(pairs.iter().skip(1)).enumerate() {
        let base = ctx.name(&format!("{}_{}", bottom.stage, top.stage));
        let mut grams = Vec::new();
        for (s, side) in sides.iter().enumerate() {
            let ((bot, bot_chw), (top_tensor, top_chw)) = (&maps[i][s], &maps[i + 1][s]);
            grams.push(flow_matrix(
                ctx.b,
                (bot, *bot_chw),
                (top_tensor, *top_chw),
                &format!("{base}/{side}"),
            ));
        }
        let dims = [
            ctx.tap_chw(top, Side::Teacher).0,
            ctx.tap_chw(bottom, Side::Teacher).0,
        ];
        terms.push(
            ctx.b
                .mse_staged(&grams[0], &grams[1], &dims, &format!("{base}/mse")),
        );
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
    bot: (&str, (i64, i64, i64)),
    top: (&str, (i64, i64, i64)),
    base: &str,
) -> String {
    let (bot_c, bot_h, bot_w) = bot.1;
    let (top_c, top_h, top_w) = top.1;
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
    b.div(&product, &area, &format!("{base}/flow"))
}
