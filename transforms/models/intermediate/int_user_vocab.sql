-- user vocabulary, fitted on train rows only: user_idx 1..n in user_id order, 0 = unknown

with

train_events as (

    select user_id
    from {{ ref('int_split') }}
    where split = 'train'

),

counted as (

    select
        user_id,
        count(*) as n_train_events
    from train_events
    group by user_id

),

indexed as (

    select
        {{ dbt.cast('row_number() over (order by user_id)', dbt.type_int()) }} as user_idx,
        user_id,
        {{ dbt.cast('n_train_events', dbt.type_int()) }} as n_train_events
    from counted

)

select * from indexed
