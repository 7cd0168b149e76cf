//! RFC 6962 Merkle trees (§2.1): leaf = SHA-256(0x00 ‖ entry), node = SHA-256(0x01 ‖ left ‖ right),
//! the split at the largest power of two below the size; audit paths (inclusion proofs) and
//! consistency proofs, made and checked. Sizes and indices are `u64` as in the RFC.

use sha2::{Digest, Sha256};

/// One node of the tree.
pub type Hash = [u8; 32];

/// SHA-256(0x00 ‖ entry).
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The root over `leaves` (leaf hashes).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest first, so each
/// append costs O(log n) and needs no earlier leaf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// One root per set bit of `size`, from the highest bit down.
    peaks: Vec<Hash>,
}

impl Frontier {
    /// The frontier of `leaves`.
    pub fn of(leaves: &[Hash]) -> Self {
        let mut frontier = Self::default();
        for leaf in leaves {
            frontier.push(*leaf);
        }
        frontier
    }

    /// A frontier from its saved parts; None unless there is one peak per set bit of `size`.
    pub fn from_parts(size: u64, peaks: Vec<Hash>) -> Option<Self> {
        (peaks.len() == size.count_ones() as usize).then_some(Self { size, peaks })
    }

    /// The peaks, largest subtree first (with [`Self::size`], all [`Self::from_parts`] needs).
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut size = self.size;
        // Each trailing one bit of the old size is a peak the new leaf completes.
        while size & 1 == 1 {
            let left = self.peaks.pop().expect("one peak per set bit");
            node = node_hash(&left, &node);
            size >>= 1;
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The tree's root.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        match peaks.next() {
            None => empty_root(),
            Some(last) => peaks.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }
}

/// The audit path of leaf `index` in the tree of `leaves` (RFC 6962 §2.1.1), from the leaf's
/// sibling up to the root's child. None when `index` is not a leaf.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Option<Vec<Hash>> {
    if index >= leaves.len() as u64 {
        return None;
    }
    let mut proof = Vec::new();
    path(leaves, index as usize, &mut proof);
    Some(proof)
}

fn path(leaves: &[Hash], index: usize, proof: &mut Vec<Hash>) {
    if leaves.len() <= 1 {
        return;
    }
    let k = split(leaves.len() as u64) as usize;
    if index < k {
        path(&leaves[..k], index, proof);
        proof.push(root(&leaves[k..]));
    } else {
        path(&leaves[k..], index - k, proof);
        proof.push(root(&leaves[..k]));
    }
}

/// Whether `proof` shows `leaf` at `index` in the tree of `size` with `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            climb_right_edge(&mut fnode, &mut snode);
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// On the tree's right edge (a left child with no right sibling), go up until the node is a
/// right child or the root: the verification loops of RFC 9162 §2.1.3.2 and §2.1.4.2.
fn climb_right_edge(fnode: &mut u64, snode: &mut u64) {
    while *fnode & 1 == 0 && *fnode != 0 {
        *fnode >>= 1;
        *snode >>= 1;
    }
}

/// The consistency proof from the tree of the first `old_size` leaves to the tree of all `leaves`
/// (RFC 6962 §2.1.2). None unless 0 < old_size ≤ leaves.len().
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Option<Vec<Hash>> {
    if old_size == 0 || old_size > leaves.len() as u64 {
        return None;
    }
    let mut proof = Vec::new();
    subproof(old_size as usize, leaves, true, &mut proof);
    Some(proof)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool, proof: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !complete {
            proof.push(root(leaves));
        }
        return;
    }
    let k = split(n as u64) as usize;
    if m <= k {
        subproof(m, &leaves[..k], complete, proof);
        proof.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, proof);
        proof.push(root(&leaves[..k]));
    }
}

/// Whether `proof` shows the tree of `old_size` with `old_root` is a prefix of the tree of
/// `new_size` with `new_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    proof: &[Hash],
    old_root: &Hash,
    new_root: &Hash,
) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    let mut proof = proof.iter();
    // A power-of-two old tree is a subtree of the new one: its root starts the path.
    let first = if old_size.is_power_of_two() {
        *old_root
    } else {
        match proof.next() {
            Some(h) => *h,
            None => return false,
        }
    };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (first, first);
    for c in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            climb_right_edge(&mut fnode, &mut snode);
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *old_root && sr == *new_root
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Certificate Transparency reference leaves and roots for sizes 0..=8.
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn h(hex: &str) -> Hash {
        hex::decode(hex).unwrap().try_into().unwrap()
    }

    fn leaves() -> Vec<Hash> {
        LEAVES
            .iter()
            .map(|l| leaf_hash(&hex::decode(l).unwrap()))
            .collect()
    }

    #[test]
    fn roots_match_the_reference_tree() {
        let leaves = leaves();
        for (size, want) in ROOTS.iter().enumerate() {
            assert_eq!(root(&leaves[..size]), h(want), "size {size}");
            assert_eq!(Frontier::of(&leaves[..size]).root(), h(want), "size {size}");
        }
    }

    #[test]
    fn proofs_match_the_reference_vectors() {
        let leaves = leaves();
        let inclusion: [(u64, &[&str]); 2] = [
            (
                0,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (index, want) in inclusion {
            let want: Vec<Hash> = want.iter().map(|x| h(x)).collect();
            assert_eq!(inclusion_proof(&leaves, index).unwrap(), want);
        }
        let consistency: [(u64, &[&str]); 2] = [
            (
                6,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        let sizes = [8usize, 5];
        for ((old, want), new) in consistency.into_iter().zip(sizes) {
            let want: Vec<Hash> = want.iter().map(|x| h(x)).collect();
            assert_eq!(consistency_proof(&leaves[..new], old).unwrap(), want);
        }
    }

    #[test]
    fn every_proof_verifies_and_no_wrong_one_does() {
        let leaves: Vec<Hash> = (0..37u8).map(|i| leaf_hash(&[i, i ^ 0x5a])).collect();
        for n in 1..=leaves.len() {
            let tree = &leaves[..n];
            let r = root(tree);
            for i in 0..n as u64 {
                let proof = inclusion_proof(tree, i).unwrap();
                assert!(verify_inclusion(&tree[i as usize], i, n as u64, &proof, &r));
                let other = (i + 1) % n as u64;
                if other != i {
                    assert!(!verify_inclusion(
                        &tree[i as usize],
                        other,
                        n as u64,
                        &proof,
                        &r
                    ));
                }
                if let Some((first, _)) = proof.split_first() {
                    let mut bad = proof.clone();
                    bad[0] = node_hash(first, first);
                    assert!(!verify_inclusion(&tree[i as usize], i, n as u64, &bad, &r));
                }
            }
            for m in 1..=n as u64 {
                let old = root(&tree[..m as usize]);
                let proof = consistency_proof(tree, m).unwrap();
                assert!(
                    verify_consistency(m, n as u64, &proof, &old, &r),
                    "{m} → {n}"
                );
                let forged = leaf_hash(b"rewritten");
                assert!(!verify_consistency(m, n as u64, &proof, &forged, &r));
                if !proof.is_empty() {
                    assert!(!verify_consistency(m, n as u64, &proof[1..], &old, &r));
                }
            }
        }
        assert!(inclusion_proof(&leaves, 37).is_none());
        assert!(consistency_proof(&leaves, 0).is_none());
    }
}
