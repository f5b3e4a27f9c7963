//! The smallest end-to-end check: the demo wiring answers a consent GET.

use crate::support::*;

#[tokio::test]
async fn get_put_get_round_trip() {
    let h = Harness::start().await;
    assert_eq!(h.get("+15550000001").await.status, 404);
    let put = h.put("+15550000001", "CONSENTED").await;
    assert_eq!(put.status, 201);
    let get = h.get("%2B15550000001").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.status_field(), "CONSENTED");
}
