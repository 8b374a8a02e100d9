//! Spearman against ../shared/golden/spearman.json (scipy.stats.spearmanr), 1e-12.

mod common;

use kdmcse::eval::spearman;

#[test]
fn spearman_matches_scipy() {
    let golden = common::golden_json("spearman.json");
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let rho = spearman(&floats(&case["x"]), &floats(&case["y"]));
        match case["expected"].as_f64() {
            Some(expected) => assert!((rho - expected).abs() < 1e-12, "{name}: {rho} != {expected}"),
            None => assert!(rho.is_nan(), "{name}: constant input must give NaN, got {rho}"),
        }
    }
}
