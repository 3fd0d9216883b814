//! Rules for matrix products: MatMul (1-D operands, broadcast batch dims), Gemm, simple Einsum.

use super::Rule;
use crate::autodiff::context::{Ctx, NodeView};
use crate::error::{Error, Result};
use crate::onnx::builder::Attr;

pub const RULES: &[(&str, Rule)] = &[("MatMul", matmul), ("Gemm", gemm), ("Einsum", einsum)];

type Adjoints = Result<Vec<Option<String>>>;

/// d (a @ b): dy @ bᵀ and aᵀ @ dy, a 1-D a read as a row and a 1-D b as a column, each product
/// summed over the batch dims the other operand broadcast it along.
fn matmul(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("MatMul has one output");
    let (a, b, y) = (n.input(0), n.input(1), n.output(0));
    let (rank_a, rank_b) = (ctx.rank(a)?, ctx.rank(b)?);
    if rank_a == 1 && rank_b == 1 {
        return Err(Error::unsupported(
            "a product of two vectors is not supported (tract does not infer its shape)",
        ));
    }
    let a2 = lift(ctx, a, rank_a, 0, &n.name("a_row"));
    let b2 = lift(ctx, b, rank_b, 1, &n.name("b_column"));
    let dy2 = match (rank_a, rank_b) {
        (1, _) => ctx.b.unsqueeze(dy, &[-2], &n.name("dy_row")),
        (_, 1) => ctx.b.unsqueeze(dy, &[-1], &n.name("dy_column")),
        _ => dy.to_string(),
    };
    let mut out = vec![None, None];
    if n.needs(0) {
        let bt = swap_last_two(ctx, &b2, rank_b.max(2), &n.name("b_t"));
        let mut da = ctx.b.matmul(&dy2, &bt, &n.name("da"));
        if rank_a == 1 {
            da = squeeze(ctx, &da, -2, &n.name("da_vector"));
        }
        if rank_b >= 2 {
            da = ctx.unbroadcast(&da, a, y)?;
        }
        out[0] = Some(da);
    }
    if n.needs(1) {
        let at = swap_last_two(ctx, &a2, rank_a.max(2), &n.name("a_t"));
        let mut db = ctx.b.matmul(&at, &dy2, &n.name("db"));
        if rank_b == 1 {
            db = squeeze(ctx, &db, -1, &n.name("db_vector"));
        }
        if rank_a >= 2 {
            db = ctx.unbroadcast(&db, b, y)?;
        }
        out[1] = Some(db);
    }
    Ok(out)
}

/// A 1-D operand with a unit axis inserted at `axis` (a matrix), others as they are.
fn lift(ctx: &mut Ctx, x: &str, rank: usize, axis: i64, name: &str) -> String {
    if rank == 1 {
        ctx.b.unsqueeze(x, &[axis], name)
    } else {
        x.to_string()
    }
}

/// `x` (rank `rank` >= 2) with its last two axes swapped.
fn swap_last_two(ctx: &mut Ctx, x: &str, rank: usize, name: &str) -> String {
    let mut perm: Vec<i64> = (0..rank as i64).collect();
    perm.swap(rank - 2, rank - 1);
    ctx.b.transpose(x, &perm, name)
}

/// `x` without its unit axis `axis`.
fn squeeze(ctx: &mut Ctx, x: &str, axis: i64, name: &str) -> String {
    let axes = ctx.b.const_i64(&format!("{name}/axes"), &[1], &[axis]);
    ctx.op("Squeeze", &[x, &axes], vec![], name)
}

/// d gemm (y = alpha A'B' + beta C, A' = Aᵀ when transA, B' = Bᵀ when transB): A's and B's
/// adjoints as one Gemm each of dy with the other operand, C's as beta dy summed over the axes
/// C was broadcast along.
fn gemm(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Gemm has one output");
    let (a, b) = (n.input(0), n.input(1));
    let alpha = n.attr_float("alpha", 1.0);
    let (trans_a, trans_b) = (n.attr_int("transA", 0) != 0, n.attr_int("transB", 0) != 0);
    let mut out = vec![None, None, None];
    if n.needs(0) {
        out[0] = Some(match trans_a {
            false => gemm_node(ctx, (dy, false), (b, !trans_b), alpha, &n.name("da")),
            true => gemm_node(ctx, (b, trans_b), (dy, true), alpha, &n.name("da")),
        });
    }
    if n.needs(1) {
        out[1] = Some(match trans_b {
            false => gemm_node(ctx, (a, !trans_a), (dy, false), alpha, &n.name("db")),
            true => gemm_node(ctx, (dy, true), (a, trans_a), alpha, &n.name("db")),
        });
    }
    if n.needs(2) {
        let summed = ctx.unbroadcast(dy, n.input(2), n.output(0))?;
        out[2] = Some(scaled(
            ctx,
            &summed,
            n.attr_float("beta", 1.0),
            &n.name("dc"),
        ));
    }
    Ok(out)
}

/// alpha · p' · q', each operand given with whether it is transposed.
fn gemm_node(
    ctx: &mut Ctx,
    (p, trans_p): (&str, bool),
    (q, trans_q): (&str, bool),
    alpha: f32,
    name: &str,
) -> String {
    ctx.op(
        "Gemm",
        &[p, q],
        vec![
            ("alpha", Attr::Float(alpha)),
            ("transA", Attr::Int(trans_p as i64)),
            ("transB", Attr::Int(trans_q as i64)),
        ],
        name,
    )
}

/// `x` times `factor` (`x` itself when the factor is 1).
fn scaled(ctx: &mut Ctx, x: &str, factor: f32, name: &str) -> String {
    if factor == 1.0 {
        return x.to_string();
    }
    let factor = ctx.b.scalar(&format!("{name}/factor"), factor);
    ctx.b.mul(x, &factor, name)
}

/// d einsum: for each operand, an Einsum of dy with the other operands that writes the operand's
/// subscripts. Simple equations only: an explicit output, no ellipsis, no subscript repeated in
/// one term, and none that only one operand has (a sum within it).
fn einsum(ctx: &mut Ctx, n: &NodeView, dy: &[Option<String>]) -> Adjoints {
    let dy = dy[0].as_deref().expect("Einsum has one output");
    let equation = n.attr_string("equation").unwrap_or_default();
    let (terms, output) = parse_einsum(&equation)?;
    if terms.len() != n.node.input.len() {
        return Err(Error::unsupported(format!(
            "its equation `{equation}` does not have one term per input"
        )));
    }
    let mut out = vec![None; terms.len()];
    for (i, term) in terms.iter().enumerate().filter(|(i, _)| n.needs(*i)) {
        let others: Vec<usize> = (0..terms.len()).filter(|&j| j != i).collect();
        let reaches = |c: char| output.contains(c) || others.iter().any(|&j| terms[j].contains(c));
        if !term.chars().all(reaches) {
            return Err(Error::unsupported(format!(
                "its equation `{equation}` sums a subscript within one operand; kdgraph differentiates simple Einsums only"
            )));
        }
        let mut sources = vec![output.as_str()];
        sources.extend(others.iter().map(|&j| terms[j].as_str()));
        let backward = format!("{}->{term}", sources.join(","));
        let mut inputs = vec![dy];
        inputs.extend(others.iter().map(|&j| n.input(j)));
        out[i] = Some(ctx.op_with_strings(
            "Einsum",
            &inputs,
            vec![],
            &[("equation", &backward)],
            &n.name(&format!("d{i}")),
        ));
    }
    Ok(out)
}

/// The input terms and the output term of an Einsum equation, refusing forms kdgraph does not
/// differentiate (implicit output, ellipsis, a subscript repeated within a term).
fn parse_einsum(equation: &str) -> Result<(Vec<String>, String)> {
    let compact: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let refuse = |why: &str| {
        Error::unsupported(format!(
            "its equation `{equation}` {why}; kdgraph differentiates simple Einsums only"
        ))
    };
    let (inputs, output) = compact
        .split_once("->")
        .ok_or_else(|| refuse("has no explicit output"))?;
    if compact.contains('.') {
        return Err(refuse("has an ellipsis"));
    }
    let terms: Vec<String> = inputs.split(',').map(str::to_string).collect();
    let repeats = |term: &str| {
        term.char_indices()
            .any(|(i, c)| term[i + c.len_utf8()..].contains(c))
    };
    if terms.iter().any(|t| repeats(t)) || repeats(output) {
        return Err(refuse("repeats a subscript within a term"));
    }
    Ok((terms, output.to_string()))
}
