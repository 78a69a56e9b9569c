-- every known user with its categorical indices (0 = value unknown or not seen in train)

with

users as (

    select * from {{ ref('stg_users') }}

),

feature_vocab as (

    select * from {{ ref('int_feature_vocab') }}

),

indexed as (

    select
        users.user_id,
        users.gender,
        users.age,
        users.occupation,
        coalesce(gender_vocab.idx, 0) as gender_idx,
        coalesce(age_vocab.idx, 0) as age_idx,
        coalesce(occupation_vocab.idx, 0) as occupation_idx
    from users
    left join feature_vocab as gender_vocab
        on gender_vocab.feature = 'gender'
        and gender_vocab.value = users.gender
    left join feature_vocab as age_vocab
        on age_vocab.feature = 'age'
        and age_vocab.value = {{ dbt.cast('users.age', dbt.type_string()) }}
    left join feature_vocab as occupation_vocab
        on occupation_vocab.feature = 'occupation'
        and occupation_vocab.value = users.occupation

)

select * from indexed
