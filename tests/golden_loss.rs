//! The KDMCSE objective against ../shared/golden/loss_kdmcse.*: losses, masks and the gradient
//! with respect to every input, for every case, and the 2-rank case computed as each rank's rows
//! against the gathered columns.

mod common;

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use kdmcse::loss::{self, FilterScore, Grounding, Objective, ObjectiveKind};

fn objective(case: &serde_json::Value) -> Objective {
    let f = |k: &str| case[k].as_f64().unwrap();
    let filter = case["threshold_on"].as_str().map(|on| match on {
        "raw_dot" => FilterScore::RawDot,
        "cosine" => FilterScore::Cosine,
        other => panic!("unknown threshold_on {other}"),
    });
    Objective {
        kind: ObjectiveKind::Kdmcse,
        temp: f("temp"),
        temp_vl: f("temp_vl"),
        lambda: f("lbd"),
        margin_text: f("margin1"),
        margin_vl: f("margin2"),
        filter,
        filter_threshold: case["score_base"].as_f64().unwrap_or(0.8),
    }
}

const INPUTS: [&str; 6] = ["z1", "z2", "p1", "p2", "v", "t"];

/// Trainable copies of the six differentiable inputs.
fn vars(t: &HashMap<String, Tensor>, prefix: &str) -> HashMap<&'static str, Var> {
    INPUTS.iter().map(|&n| (n, Var::from_tensor(&t[&format!("{prefix}{n}")]).unwrap())).collect()
}

/// Within the golden file's own absolute tolerance.
fn close(ours: f64, expected: f64, abs: f64) -> bool {
    (ours - expected).abs() <= abs
}

#[test]
fn every_case_matches_the_reference() {
    let golden = common::golden("loss_kdmcse.safetensors");
    let meta = common::golden_json("loss_kdmcse.json");
    let cases = meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let p = format!("{name}/");
        let obj = objective(case);
        let x = vars(&golden, &p);
        let img = &golden[&format!("{p}img_raw")];
        let cap = &golden[&format!("{p}cap_raw")];
        let g = Grounding {
            p1: x["p1"].as_tensor(),
            p2: x["p2"].as_tensor(),
            v: x["v"].as_tensor(),
            t: x["t"].as_tensor(),
            img_rows: img,
            cap_rows: cap,
            img_cols: img,
            cap_cols: cap,
        };
        let terms = obj.compute(x["z1"].as_tensor(), x["z2"].as_tensor(), Some(&g), 0).unwrap();
        let tol = &case["tolerance"];
        let (loss_tol, grad_tol) = (tol["loss_abs"].as_f64().unwrap(), tol["grad_abs"].as_f64().unwrap());
        for (term, ours) in
            [("intra", &terms.text), ("inter", terms.grounding.as_ref().unwrap()), ("total", &terms.total)]
        {
            let (ours, expected) = (loss::scalar(ours).unwrap(), case[term].as_f64().unwrap());
            assert!(close(ours, expected, loss_tol), "{name} {term}: {ours} vs {expected}");
        }
        let masked = case["n_masked_pv"].as_u64().unwrap() + case["n_masked_pt"].as_u64().unwrap();
        assert_eq!(terms.masked_negatives as u64, masked, "{name}: masked negatives");
        if let Some(f) = obj.negative_filter() {
            for (mask, rows, cols) in [("mask_pv", cap, img), ("mask_pt", img, cap)] {
                let ours = f.mask(rows, cols, 0).unwrap();
                let expected = golden[&format!("{p}{mask}")].to_dtype(candle_core::DType::F32).unwrap();
                assert_eq!(common::max_abs_diff(&ours, &expected), 0.0, "{name} {mask}");
            }
        }
        let grads = terms.total.backward().unwrap();
        for n in INPUTS {
            let ours = grads.get(x[n].as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let diff = common::max_abs_diff(ours, &golden[&format!("{p}grad_{n}")]);
            assert!(diff < grad_tol, "{name} grad_{n}: max abs diff {diff}");
        }
        // The grounding term at full weight (lambda = 1): in the total its gradients are scaled
        // by lambda = 0.01, which would hide an error 100 times the tolerance. Only it reaches
        // p1, p2, v and t, so its gradient there is the golden one divided by lambda.
        let grounding = terms.grounding.as_ref().unwrap().backward().unwrap();
        for n in ["p1", "p2", "v", "t"] {
            let expected = (&golden[&format!("{p}grad_{n}")] / obj.lambda).unwrap();
            let diff = common::max_abs_diff(grounding.get(x[n].as_tensor()).unwrap(), &expected);
            assert!(diff < grad_tol, "{name} d(grounding)/d{n} at lambda 1: max abs diff {diff}");
        }
    }
}

#[test]
fn two_ranks_with_gathered_columns_equal_one_process() {
    let golden = common::golden("loss_kdmcse.safetensors");
    let meta = common::golden_json("loss_kdmcse.json");
    let case = &meta["multirank"];
    let obj = objective(case);
    let world = case["world_size"].as_u64().unwrap() as usize;
    let local = case["local_bs"].as_u64().unwrap() as usize;
    // The "all-gather": the global batch is the ranks' rows in rank order.
    let gather = |n: &str| {
        let parts: Vec<Tensor> =
            (0..world).map(|r| golden[&format!("multirank/rank{r}/{n}")].clone()).collect();
        Tensor::cat(&parts, 0).unwrap()
    };
    let global: HashMap<&str, Var> =
        INPUTS.iter().map(|&n| (n, Var::from_tensor(&gather(n)).unwrap())).collect();
    let (img, cap) = (gather("img_raw"), gather("cap_raw"));
    let mut sum_of_locals: Option<Tensor> = None;
    for rank in 0..world {
        let offset = rank * local;
        let rows = |t: &Tensor| t.narrow(0, offset, local).unwrap();
        let (p1, p2, img_rows, cap_rows) =
            (rows(global["p1"].as_tensor()), rows(global["p2"].as_tensor()), rows(&img), rows(&cap));
        let g = Grounding {
            p1: &p1,
            p2: &p2,
            v: global["v"].as_tensor(),
            t: global["t"].as_tensor(),
            img_rows: &img_rows,
            cap_rows: &cap_rows,
            img_cols: &img,
            cap_cols: &cap,
        };
        let terms =
            obj.compute(&rows(global["z1"].as_tensor()), global["z2"].as_tensor(), Some(&g), offset).unwrap();
        let r = &case["ranks"][rank];
        for (term, ours) in [
            ("local_intra", &terms.text),
            ("local_inter", terms.grounding.as_ref().unwrap()),
            ("local_total", &terms.total),
        ] {
            let (ours, expected) = (loss::scalar(ours).unwrap(), r[term].as_f64().unwrap());
            assert!(close(ours, expected, 1e-5), "rank {rank} {term}: {ours} vs {expected}");
        }
        sum_of_locals = Some(match sum_of_locals {
            None => terms.total,
            Some(s) => (s + terms.total).unwrap(),
        });
    }
    // Mean over ranks of the local losses is the global loss; its gradient, sliced per rank,
    // is what each rank's all-reduced gradient must be.
    let mean = (sum_of_locals.unwrap() / world as f64).unwrap();
    let expected_total = case["global_total"].as_f64().unwrap();
    assert!(close(loss::scalar(&mean).unwrap(), expected_total, 1e-5));
    let grads = mean.backward().unwrap();
    for rank in 0..world {
        for n in INPUTS {
            let ours = grads.get(global[n].as_tensor()).unwrap().narrow(0, rank * local, local).unwrap();
            let diff = common::max_abs_diff(&ours, &golden[&format!("multirank/rank{rank}/grad_{n}")]);
            assert!(diff < 1e-5, "rank {rank} grad_{n}: max abs diff {diff}");
        }
    }
}
