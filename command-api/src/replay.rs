//! The whole-log audit lives in `infra::replay`, shared with the projector and the `ledger` CLI;
//! re-exported here for the write side's tests.

pub use infra::replay::audit;

#[cfg(test)]
mod tests {
    use cqrs_es::Aggregate;

    use infra::codec::EVENT_VERSION;

    use crate::aggregates::{AccountAggregate, TransactionAggregate};

    #[test]
    fn the_shared_decoder_reads_what_this_store_writes() {
        assert_eq!(AccountAggregate::TYPE, infra::replay::ACCOUNT_STREAM);
        assert_eq!(
            TransactionAggregate::TYPE,
            infra::replay::TRANSACTION_STREAM
        );
        assert_eq!(EVENT_VERSION, infra::replay::EVENT_VERSION);
    }
}
