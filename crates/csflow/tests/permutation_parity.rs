//! numpy's legacy generator, reproduced: permutations written by reference/make_fixtures.py.
mod common;

use common::Fixture;
use csflow::flow::permutation::{block_permutations, Mt19937};

#[test]
fn equal_to_numpy() {
    let fx = Fixture::load("permutations.safetensors");
    let mut checked = 0;
    for c in [2usize, 7, 16, 32, 192, 304, 1000] {
        for seed in 0..4 {
            let ours = block_permutations(c, seed, 3);
            for (i, p) in ours.iter().enumerate() {
                let want: Vec<i64> = fx.t(&format!("c{c}_seed{seed}_scale{i}")).to_vec1().unwrap();
                let got: Vec<i64> = p.iter().map(|&v| v as i64).collect();
                assert_eq!(got, want, "C={c} seed={seed} scale={i}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 7 * 4 * 3);
}

#[test]
fn raw_stream_equal_to_numpy() {
    let fx = Fixture::load("permutations.safetensors");
    let want: Vec<i64> = fx.t("mt_5489_first8").to_vec1().unwrap();
    let mut rng = Mt19937::new(5489);
    let got: Vec<i64> = (0..8).map(|_| rng.next_u32() as i64).collect();
    assert_eq!(got, want);
}
