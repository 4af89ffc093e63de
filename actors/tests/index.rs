//! The iroh-blobs index on a real file store: blobs committed by the engine become
//! iroh-blobs entries whose verified reads return the same bytes, and damage to the bytes on
//! disk is caught by iroh-blobs' verification as well as by `check_blobs`.

use alknet_actors::engine::{Access, Engine, Scope};
use alknet_actors::index::BlobIndex;
use alknet_actors::proto::path::TreePath;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_blobs_read_back_verified_and_damage_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    Engine::init(dir.path()).unwrap();
    let mut engine = Engine::open(dir.path(), Access::Write).unwrap();
    let scope = Scope::new("default", "main");
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    engine.put_reader(&scope, &big[..], &TreePath::parse("/big").unwrap(), |_| {}).unwrap();
    engine.put_reader(&scope, &b"small"[..], &TreePath::parse("/small").unwrap(), |_| {}).unwrap();
    let big_hash = engine.file_entry(&scope, &TreePath::parse("/big").unwrap()).unwrap().hash;
    let small_hash = engine.file_entry(&scope, &TreePath::parse("/small").unwrap()).unwrap().hash;

    let index = BlobIndex::open(dir.path()).await.unwrap();
    let report = engine.index_blobs(&index).await.unwrap();
    assert_eq!((report.ok, report.failed.len()), (2, 0));
    assert_eq!(engine.index_blobs(&index).await.unwrap().ok, 0, "indexing twice re-added blobs");
    assert_eq!(index.verified_bytes(&big_hash).await.unwrap(), big);
    assert_eq!(&index.verified_bytes(&small_hash).await.unwrap()[..], b"small");
    // By reference: iroh-blobs keeps no second copy of the 5 MB.
    let data_bytes: u64 = std::fs::read_dir(dir.path().join("blobs/data")).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
    assert!(data_bytes < 1_000_000, "the index copied the blob ({data_bytes} bytes in blobs/data)");

    // Damage the file blob in place.
    let path = engine.content().blob_path(&big_hash);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4_000_000] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(index.verified_bytes(&big_hash).await.is_err(), "iroh-blobs served damaged bytes");
    index.shutdown().await.unwrap();
    let scrub = engine.check_blobs(|_| {}).unwrap();
    assert_eq!(scrub.ok, 1);
    assert_eq!(scrub.failed.len(), 1);
    assert!(scrub.failed[0].1.contains("corrupt"), "{}", scrub.failed[0].1);
}
