//! Where a version of a job's row lies in `jobs_active` (its `ctid`): the claim reads it, the
//! completer uses it to write the attempt's end without probing the primary key.
//!
//! An address is a hint, never an identity. A row's address changes whenever the row is updated (a
//! heartbeat, a cancel request), and once a row is gone its address may hold another job's row, so
//! every statement that takes one also matches the job's id and attempt, and a job whose address no
//! longer finds it is looked up by id instead.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// A `tid`: page number and line pointer within the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowAddress {
    pub block: u32,
    pub offset: u16,
}

impl<'a> FromSql<'a> for RowAddress {
    /// The binary form PostgreSQL sends (`tidsend`): the block as 4 bytes, the offset as 2, big-endian.
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<RowAddress, Box<dyn Error + Sync + Send>> {
        match raw {
            [b0, b1, b2, b3, o0, o1] => Ok(RowAddress {
                block: u32::from_be_bytes([*b0, *b1, *b2, *b3]),
                offset: u16::from_be_bytes([*o0, *o1]),
            }),
            _ => Err(format!("a tid is 6 bytes, got {}", raw.len()).into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }
}

impl ToSql for RowAddress {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_u32(self.block);
        out.put_u16(self.offset);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_goes_out_as_it_came_in() {
        let a = RowAddress { block: 0x0102_0304, offset: 0x0506 };
        let mut out = BytesMut::new();
        a.to_sql(&Type::TID, &mut out).unwrap();
        assert_eq!(&out[..], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(RowAddress::from_sql(&Type::TID, &out).unwrap(), a);
        assert!(RowAddress::from_sql(&Type::TID, &[1, 2, 3]).is_err(), "a short value is an error");
        assert!(!<RowAddress as FromSql>::accepts(&Type::TEXT));
    }
}
