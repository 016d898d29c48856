//! numpy's legacy random generator (`numpy.random.seed` + `numpy.random.permutation`), bit for bit.
//!
//! The authors fix each flow block's channel permutations with `np.random.seed(k)`; a model trained by
//! their code only works with the very same permutations, so csflow reproduces the generator exactly.

/// MT19937 as numpy's `RandomState` runs it (`init_genrand` seeding, 32-bit tempered outputs).
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// `np.random.seed(seed)` for an integer seed (numpy's legacy seeding accepts 0..2^32).
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 == 1 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A uniform integer in 0..=max by masked rejection, as numpy's legacy `random_interval`.
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mask = u32::MAX >> max.leading_zeros();
        loop {
            let v = self.next_u32() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `RandomState.permutation(n)`: a Fisher-Yates shuffle of 0..n from the last element down.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        assert!(n <= u32::MAX as usize, "permutation length beyond numpy's 32-bit interval path");
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u32) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// The permutations of flow block `block` for `n_scales` scales of `channels` channels: the i-th successive
/// draw after seeding with the block index.
pub fn block_permutations(channels: usize, block: usize, n_scales: usize) -> Vec<Vec<usize>> {
    let mut rng = Mt19937::new(block as u32);
    (0..n_scales).map(|_| rng.permutation(channels)).collect()
}

/// The inverse of a permutation: `inv[p[i]] = i`.
pub fn inverse(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; p.len()];
    for (i, &v) in p.iter().enumerate() {
        inv[v] = i;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        let p = block_permutations(304, 0, 3);
        assert_eq!(p[0][..6], [66, 156, 247, 267, 145, 135]);
        assert_eq!(p[1][..6], [222, 196, 64, 232, 186, 40]);
        assert_eq!(p[2][..6], [14, 158, 98, 275, 225, 261]);
        assert_eq!(block_permutations(304, 3, 1)[0][..6], [246, 162, 10, 161, 73, 16]);
        let p = block_permutations(16, 0, 3);
        assert_eq!(p[0], [1, 6, 8, 9, 13, 4, 2, 14, 10, 7, 15, 11, 3, 0, 5, 12]);
        assert_eq!(p[1], [2, 14, 12, 9, 0, 3, 4, 10, 11, 5, 15, 8, 13, 7, 6, 1]);
        assert_eq!(p[2], [5, 13, 7, 4, 10, 14, 6, 11, 9, 12, 1, 8, 3, 2, 0, 15]);
    }

    #[test]
    fn mt19937_reference_output() {
        // The generator's published first output for the default seed 5489.
        assert_eq!(Mt19937::new(5489).next_u32(), 3_499_211_612);
    }

    #[test]
    fn inverse_undoes() {
        let p = block_permutations(37, 2, 1).remove(0);
        let inv = inverse(&p);
        for i in 0..37 {
            assert_eq!(inv[p[i]], i);
        }
    }
}
