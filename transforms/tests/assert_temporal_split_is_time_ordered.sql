-- temporal split rule: max(train ts) <= min(valid ts), max(valid ts) <= min(test ts) and
-- max(train ts) <= min(test ts). Only meaningful for var split = temporal; for the other
-- splits the where clause below makes it return nothing.

with

ratings as (

    select split, ts from {{ ref('fct_ratings') }}

),

bounds as (

    select
        max(case when split = 'train' then ts end) as max_train_ts,
        min(case when split = 'valid' then ts end) as min_valid_ts,
        max(case when split = 'valid' then ts end) as max_valid_ts,
        min(case when split = 'test' then ts end) as min_test_ts
    from ratings

)

select *
from bounds
where '{{ var("split") }}' = 'temporal'
  and (
      max_train_ts > min_valid_ts
      or max_valid_ts > min_test_ts
      or max_train_ts > min_test_ts
  )
