//! How the domain's vocabularies are stored: `Phase`, `Reason` and `Language` are text columns
//! (users' SQL reads them without casts), encoded and decoded here and nowhere else.
//!
//! Decoding is exact: a stored value that is not one of the names (a hand edit, a newer
//! service's phase) is a decode error the caller sees, never a guess. The phase sets that SQL
//! needs (`agenttask.active_phases()`, `agenttask.unfinished_phases()`, from the migrations) are
//! checked against [`Phase::ACTIVE`] and [`Phase::UNFINISHED`] by the integration tests.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

use crate::domain::phase::{Phase, Reason};
use crate::domain::task::Language;

macro_rules! stored_as_text {
    ($ty:ty, $what:literal) => {
        impl Type<Postgres> for $ty {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }
            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $ty {
            fn array_type_info() -> PgTypeInfo {
                <&str as PgHasArrayType>::array_type_info()
            }
        }

        impl Encode<'_, Postgres> for $ty {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $ty {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let s = <&str as Decode<Postgres>>::decode(value)?;
                <$ty>::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!(concat!("stored ", $what, " {:?} is not one this service knows"), s).into())
            }
        }
    };
}

stored_as_text!(Phase, "phase");
stored_as_text!(Reason, "reason");
stored_as_text!(Language, "language");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_encodes_as_its_text() {
        for p in Phase::ALL {
            let mut buf = PgArgumentBuffer::default();
            let _ = <Phase as Encode<Postgres>>::encode_by_ref(&p, &mut buf).unwrap();
            assert_eq!(&**buf, p.as_str().as_bytes());
        }
        for r in Reason::ALL {
            let mut buf = PgArgumentBuffer::default();
            let _ = <Reason as Encode<Postgres>>::encode_by_ref(&r, &mut buf).unwrap();
            assert_eq!(&**buf, r.as_str().as_bytes());
        }
    }
}
