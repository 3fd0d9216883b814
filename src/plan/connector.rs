//! Connectors: the small trainable networks a method inserts on a tap, described as data so the
//! report can show them and the graph builder can build any of them.

use std::fmt;

use serde::Serialize;

use crate::analysis::{shapes::fixed, show_shape, TensorInfo};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Teacher,
    Student,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Teacher => "teacher",
            Side::Student => "student",
        })
    }
}

/// How a conv's weight starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvInit {
    /// PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    TorchDefault,
    /// N(0, 2 / (kh * kw * out_channels)), as OFD's connector.
    HeOut,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Layer {
    Conv {
        in_channels: i64,
        out_channels: i64,
        kernel: [i64; 2],
        stride: i64,
        pad: i64,
        bias: bool,
        init: ConvInit,
    },
    /// Nearest-neighbour upsampling by 2 of a C x H x W map (then a conv, in place of a transposed conv).
    Upsample2x {
        channels: i64,
        height: i64,
        width: i64,
    },
    BatchNorm {
        channels: i64,
    },
    Relu,
    LeakyRelu {
        slope: f64,
    },
    Linear {
        in_features: i64,
        out_features: i64,
    },
    /// x / ||x||_2 along the feature axis.
    L2Normalize,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Conv {
                in_channels,
                out_channels,
                kernel,
                stride,
                ..
            } => {
                write!(f, "conv{}x{}", kernel[0], kernel[1])?;
                if *stride != 1 {
                    write!(f, "/{stride}")?;
                }
                write!(f, " {in_channels}->{out_channels}")
            }
            Layer::Upsample2x { .. } => f.write_str("upsample x2 (nearest)"),
            Layer::BatchNorm { .. } => f.write_str("BN"),
            Layer::Relu => f.write_str("ReLU"),
            Layer::LeakyRelu { .. } => f.write_str("LeakyReLU"),
            Layer::Linear {
                in_features,
                out_features,
            } => write!(f, "linear {in_features}->{out_features}"),
            Layer::L2Normalize => f.write_str("L2-normalise"),
        }
    }
}

/// A named chain of layers applied to one side's tap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Connector {
    pub name: &'static str,
    pub side: Side,
    pub layers: Vec<Layer>,
}

impl Connector {
    /// The channels (or features) the connector outputs, where its layers say.
    pub fn out_channels(&self) -> Option<i64> {
        self.layers.iter().rev().find_map(|layer| match layer {
            Layer::Conv { out_channels, .. } => Some(*out_channels),
            Layer::BatchNorm { channels } => Some(*channels),
            Layer::Linear { out_features, .. } => Some(*out_features),
            _ => None,
        })
    }
}

impl fmt::Display for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layers: Vec<String> = self.layers.iter().map(Layer::to_string).collect();
        write!(f, "{} on {}: {}", self.name, self.side, layers.join(" + "))
    }
}

pub fn conv(in_channels: i64, out_channels: i64, kernel: i64, stride: i64, bias: bool) -> Layer {
    Layer::Conv {
        in_channels,
        out_channels,
        kernel: [kernel, kernel],
        stride,
        pad: kernel / 2,
        bias,
        init: ConvInit::TorchDefault,
    }
}

/// (C, H, W) of an NCHW tap with fixed channel and spatial dims.
pub fn chw(info: &TensorInfo) -> Result<(i64, i64, i64)> {
    match info.shape.as_slice() {
        [_, c, h, w] => match (fixed(c), fixed(h), fixed(w)) {
            (Some(c), Some(h), Some(w)) => Ok((c, h, w)),
            _ => Err(not_spatial(info)),
        },
        _ => Err(not_spatial(info)),
    }
}

/// RepDistiller's `feat_dim`: the size CC's and CRD's embedding connectors project to.
pub const FEAT_DIM: i64 = 128;

/// The `feat_dim` option of a method's values (CC, CRD), else RepDistiller's.
pub fn feat_dim(options: &super::OptionValues) -> i64 {
    super::option_value(options, "feat_dim").map_or(FEAT_DIM, |v| v.as_i64())
}

/// The `feat_dim` option of an embedding method, as `--<flag>` (CC's and CRD's).
pub const fn feat_dim_option(flag: &'static str) -> super::OptionSpec {
    super::OptionSpec {
        flag,
        key: "feat_dim",
        value_name: "D",
        help: "the size of the embeddings compared",
        default: Some(super::OptionValue::Int(FEAT_DIM)),
        kind: super::OptionKind::Int,
        min: 1.0,
        max: 65536.0,
    }
}

/// An `embed` connector on each side (CC's and CRD's): a linear from the embedding to
/// `feat_dim`, then `after` (CRD's L2 normalisation).
pub fn embeddings_on_both_sides(
    teacher: &TensorInfo,
    student: &TensorInfo,
    options: &super::OptionValues,
    after: &[Layer],
) -> Result<Vec<Connector>> {
    let embed = |info: &TensorInfo, side: Side| -> Result<Connector> {
        let mut layers = vec![Layer::Linear {
            in_features: features(info)?,
            out_features: feat_dim(options),
        }];
        layers.extend(after.iter().cloned());
        Ok(Connector {
            name: "embed",
            side,
            layers,
        })
    };
    Ok(vec![
        embed(student, Side::Student)?,
        embed(teacher, Side::Teacher)?,
    ])
}

/// The feature size of a [N, D] embedding, or of [N, C, H, W] averaged over space (the input
/// of a convolutional classifier).
pub fn features(info: &TensorInfo) -> Result<i64> {
    match info.shape.as_slice() {
        [_, d] | [_, d, _, _] => fixed(d).ok_or_else(|| not_embedding(info)),
        _ => Err(not_embedding(info)),
    }
}

fn not_spatial(info: &TensorInfo) -> Error {
    Error::invalid_model(format!(
        "tensor `{}` has shape {}, not N x C x H x W with fixed C, H, W; tap a feature map instead",
        info.tensor,
        show_shape(&info.shape)
    ))
}

fn not_embedding(info: &TensorInfo) -> Error {
    Error::invalid_model(format!(
        "tensor `{}` has shape {}, not an N x D embedding; tap the classifier's input instead",
        info.tensor,
        show_shape(&info.shape)
    ))
}

/// FitNet's size-matching conv (METHODS.md 2): stride-2 3x3 when the student map is twice the
/// teacher's, x2 upsampling then 3x3 when half, else a (1+s-t) kernel; no padding in the last case.
pub fn size_matching_conv(teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Layer>> {
    let (s_c, s_h, s_w) = chw(student)?;
    let (t_c, t_h, t_w) = chw(teacher)?;
    if s_h == 2 * t_h && s_w == 2 * t_w {
        Ok(vec![conv(s_c, t_c, 3, 2, true)])
    } else if 2 * s_h == t_h && 2 * s_w == t_w {
        Ok(vec![
            Layer::Upsample2x {
                channels: s_c,
                height: s_h,
                width: s_w,
            },
            conv(s_c, t_c, 3, 1, true),
        ])
    } else if s_h >= t_h && s_w >= t_w {
        let kernel = [1 + s_h - t_h, 1 + s_w - t_w];
        Ok(vec![Layer::Conv {
            in_channels: s_c,
            out_channels: t_c,
            kernel,
            stride: 1,
            pad: 0,
            bias: true,
            init: ConvInit::TorchDefault,
        }])
    } else {
        Err(Error::unsupported(format!(
            "student tap `{}` ({s_h}x{s_w}) is smaller than teacher tap `{}` ({t_h}x{t_w}) by a factor other than 2; \
             choose taps of matching resolution with --tap",
            student.tensor, teacher.tensor
        )))
    }
}
